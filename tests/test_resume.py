"""What may change when a run resumes (train/resume.py), checked on configs alone: no checkpoint needed."""
import pytest

from diffmoe_jax.config import ConfigError
from diffmoe_jax.train import resume
from test_config import load


def check(saved, config):
  resume.check(config, saved_config=saved.to_dict(), saved_shapes=None, abstract_state=None, step=7,
               directory="ckpts")


def test_moving_the_token_cache_is_free_but_changing_the_data_is_not():
  """The token cache is keyed by the data it holds: resuming with it elsewhere (a faster disk, another
  machine) trains the same run, so it is not refused as a config change."""
  saved, config = load("tiny"), load("tiny")
  config.data.cache_dir = "/scratch/diffmoe_cache"
  check(saved, config)
  config.data.val_fraction = 0.1
  with pytest.raises(ConfigError, match=r"saved with another config: data\.val_fraction 0\.05 -> 0\.1\. .*"
                                        r"--config\.train\.allow_config_change=data\.val_fraction,"):
    check(saved, config)
