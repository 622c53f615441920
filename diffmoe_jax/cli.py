"""Command-line handling shared by the package's commands: config file and flag mistakes as one-line errors.

ml_collections reports a missing config file, a syntax error in one, or an override of a field that does
not exist with a long traceback from inside flag parsing. `parse_flags` checks those first and prints one
line naming the file, or the full field path with the closest existing names.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import os
import re
import signal
import sys
import threading
import traceback
from typing import Callable

from absl import flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from diffmoe_jax import config as config_lib


def define_config_flag(default: str | None, help_string: str) -> flags.FlagHolder:
  """The --config flag (new keys accepted; `parse_flags` admits them only in config.OPEN_DICTS)."""
  try:  # ml_collections reads the command line's --flagfile files here, as it defines the flag
    holder = config_flags.DEFINE_config_file("config", default, help_string, lock_config=False,
                                             accept_new_attributes=True)
  except flags.CantOpenFlagFileError as e:
    print(f"error: --flagfile: {str(e).removeprefix('ERROR:: ')}; pass a file of flags, one per line.", file=sys.stderr)
    sys.exit(1)
  # ml_collections files the flag under this module; --help lists only the running command's own flags.
  flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])
  return holder


def _config_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    match = re.match(r"^--?config(=|$)", arg)
    if match:
      return arg.split("=", 1)[1] if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _expand_config_home(argv: list[str]) -> list[str]:
  """`argv` with a leading ~ of --config=~/... expanded, as --workdir's is: the shell expands it only at the start
  of a word (--config ~/...), and the flag parser reads the path as it is."""
  return [re.sub(r"^(--?config=)(~.*)$", lambda m: m.group(1) + os.path.expanduser(m.group(2)), arg) for arg in argv]


def _override_paths(argv: list[str]) -> list[str]:
  return [arg.split("=", 1)[0].split(".", 1)[1] for arg in argv if re.match(r"^--?(no)?config\.", arg)]


def load_config(path: str, arg: str | None = None):
  """The config `path`'s get_config() returns, or a one-line description of why it cannot be loaded."""
  if not os.path.isfile(path):
    return None, f"--config: {_missing_config(path)}"
  try:
    with open(path, encoding="utf-8") as f:
      compile(f.read(), path, "exec")
  except SyntaxError as e:
    return None, f"--config: {path} line {e.lineno}: {e.msg}: {(e.text or '').strip()}"
  try:
    config = config_lib.load_file(path, arg)
  except Exception as e:  # pylint: disable=broad-except  (whatever the user's file raises)
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
    line = f" line {frames[-1].lineno}" if frames else ""
    return None, f"--config: {path}{line}: {type(e).__name__}: {e}"
  except SystemExit:  # a script (such as setup.py) that parses the command line itself
    return None, f"--config: {path} exited while it was loaded, so it is no config file; pass one with get_config()."
  if not isinstance(config, ml_collections.ConfigDict):
    return None, (f"--config: {path}: get_config() returned {type(config).__name__}, not an "
                  "ml_collections.ConfigDict; return one, as configs/tiny.py does (diffmoe_jax.config.defaults(), "
                  "updated).")
  return config, None


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds configs/ in a checkout


def relative_to_cwd(path: str) -> str:
  """What a message naming a `path` that is not there adds: the current directory a relative one (as it is opened)
  starts from, nothing for an absolute one."""
  return "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"


def _missing_config(path: str) -> str:
  """Why `path` is no config file, and the file meant: a directory's config files, the checkout's file of that
  relative path when run from another directory, or the closest name beside it."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".py") and not n.startswith("_"))
    listed = f"; its config files: {', '.join(os.path.join(path, n) for n in names[:8])}" if names else ""
    return f"{path} is a directory, not a config file{listed}."
  where = relative_to_cwd(path)
  in_checkout = os.path.join(REPO_ROOT, path)
  if not os.path.isabs(path) and os.path.isfile(in_checkout):
    return (f"there is no config file {path}{where}; pass --config={in_checkout}, or run from {REPO_ROOT}, as "
            "relative paths (--workdir's too) start from the current directory.")
  folder, name = os.path.split(path)
  names = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
  close = difflib.get_close_matches(name.removesuffix(".py") + ".py", [n for n in names if n.endswith(".py")], n=1,
                                    cutoff=0.75)
  example = os.path.join(REPO_ROOT, "configs", "tiny.py")
  example = example if os.path.isfile(example) else "configs/tiny.py"
  hint = (f"did you mean {os.path.join(folder, close[0])}?" if close else
          f"pass the path of a file with get_config(), such as {example}.")
  return f"there is no config file {path}{where}; {hint}"


def _fields(node, prefix: str = "") -> list[str]:
  out = []
  for key in node.keys():
    out.append(prefix + key)
    if hasattr(node[key], "keys"):
      out.extend(_fields(node[key], prefix + key + "."))
  return out


def _closest(config, parent: str, name: str, *, section: bool, cutoff: float = 0.6) -> list[str]:
  """Up to three field paths whose last name is close to `name`, those under `parent` first: sections
  (dicts) if `section`, else leaves, since a value set on a section or a field under a leaf is no fix."""
  scored = []
  for field in _fields(config):
    head, _, last = field.rpartition(".")
    if hasattr(config[field], "keys") != section:
      continue
    ratio = difflib.SequenceMatcher(None, name, last).ratio()
    if ratio >= cutoff:
      scored.append((head == parent, ratio, field))
  return [field for *_, field in sorted(scored, reverse=True)[:3]]


def _unknown_field(config, path: str) -> str | None:
  """Why `--config.<path>` names no field (with the closest names), or None if it does."""
  node, parts = config, path.split(".")
  for i, part in enumerate(parts):
    parent = ".".join(parts[:i])
    if "[" in part or not hasattr(node, "keys"):
      return None  # indexing and non-dict values are left to the flag parser
    if part not in node:
      if config_lib.is_open_dict(parent) and i == len(parts) - 1:
        return None
      siblings = sorted(node.keys())
      section = i < len(parts) - 1
      close = _closest(config, parent, part, section=section)
      owner = f"config.{parent}" if parent else "the config"
      if any(c.rpartition(".")[0] == parent for c in close):
        return f"--config.{path}: {owner} has no field {part!r}; closest: {', '.join(close)}."
      # Nothing close in its own section: list that section, and what is much closer elsewhere.
      close = _closest(config, parent, part, section=section, cutoff=0.75)
      hint = (f"its fields: {', '.join(siblings[:12])}"
              + (f" and {len(siblings) - 12} more" if len(siblings) > 12 else "")
              + (f"; close elsewhere: {', '.join(close)}" if close else ""))
      return f"--config.{path}: {owner} has no field {part!r}; {hint}."
    node = node[part]
  return None


def check_command_line(argv: list[str], default_config: str | None) -> str | None:
  """A one-line description of the first config file or override mistake in `argv`, or None."""
  value = _config_arg(argv)
  if value is not None and not value.strip():  # such as --config=$CONFIG with the variable unset
    return "--config is empty; pass a config file, such as --config=configs/tiny.py."
  value = value or default_config
  if value is None:
    overrides = _override_paths(argv)
    if overrides:  # the flag parser knows --config.<field> flags only once a config file defines them
      return (f"--config.{overrides[0]} overrides a field of a config file, but no --config is given; pass the "
              "file too, such as --config=configs/tiny.py.")
    return None  # a required --config is reported by the flag parser
  path, _, arg = value.partition(":")
  config, problem = load_config(path, arg or None)
  if problem:
    return problem
  for override in _override_paths(argv):
    problem = _unknown_field(config, override)
    if problem:
      return problem
  return None


_VALUE_KINDS = (("invalid literal for int()", "not an integer", "a whole number"),
                ("could not convert string to float", "not a number", "a number such as 0.5"),
                ("Non-boolean argument", "not a boolean", "true or false"),
                ("as a ConfigDict", "not a dict", "a dict such as \"{{'key': 'value'}}\", or one key at a time: "
                 "--config.{field}.<key>=<value>"))


def _bad_value(problem: str, argv: list[str], default_config: str | None) -> str:
  """absl's "flag --F=V: <Python's parse error>" as what F takes, with the config file's value of a config field."""
  match = re.match(r"flag (--[^=]+)=(.*?): (.*)$", problem)
  if not match:
    return problem
  flag, value, reason = match.groups()
  for error, what, takes in _VALUE_KINDS:
    if error in reason:
      break
  else:
    return f"{flag}={value}: {reason}"
  field = flag.removeprefix("--config.")
  if field == flag:
    return f"{flag}={value}: {value!r} is {what}; pass {takes}."
  path, _, arg = (_config_arg(argv) or default_config or "").partition(":")
  config, _ = load_config(path, arg or None)  # FILE:ARG: get_config(ARG), as the flag parser loads it
  try:
    there = config[field] if config is not None else None
    there = there.to_dict() if isinstance(there, ml_collections.ConfigDict) else there  # one line, not YAML
    current = f" ({path} has {there!r})" if config is not None else ""
  except (KeyError, AttributeError):
    current = ""
  return f"{flag}={value}: {value!r} is {what}; {field} takes {takes.format(field=field)}{current}."


def _library_log_filter(record) -> bool:
  """Whether the absl handler shows a library's log record.

  Orbax logs every save and restore at INFO, and a damaged checkpoint or a failed save as warnings and
  ERROR tracebacks from its threads, all of which the checkpointer reports itself, in one line each; JAX
  logs each backend it probes and does not find (libtpu on a machine without a TPU) at INFO. A failed
  restore's other tensorstore reads end as asyncio tasks whose errors nobody retrieves, and asyncio logs
  each one with its traceback when the task is collected. TensorBoard's event reader (the ablation report reads
  the runs' logs) logs at INFO that each event file has no successor ("No path found after ...").
  """
  if "/orbax/" in record.pathname:
    return False
  if record.name == "asyncio" and "tensorstore_spec" in record.getMessage():
    return False
  if record.name.startswith("tensorboard") and record.levelno < logging.WARNING:
    return False
  if record.name == "jax._src.xla_bridge" and record.levelno < logging.WARNING:
    return not record.getMessage().startswith("Unable to initialize backend")
  return True


def quiet_library_output() -> None:
  """Keeps the libraries' routine chatter and duplicate error reports off the terminal (see above). The absl
  logger is filtered as well as its handler, which only an absl app installs (a notebook logs through the
  root logger's). Other unraisable exceptions go on to the hook installed before (`keep_dropped_interrupts`,
  which `start_command` installs before a command's main runs)."""
  absl_logging.get_absl_handler().addFilter(_library_log_filter)
  absl_logging.get_absl_logger().addFilter(_library_log_filter)
  previous_hook = sys.unraisablehook  # `keep_dropped_interrupts`'s, which must keep resending a dropped Ctrl-C

  def drop_closed_loop_noise(unraisable):
    """Tensorstore reads that complete after Orbax closed a failed restore's event loop each print a
    "RuntimeError: Event loop is closed" traceback; the restore's own error is reported once instead."""
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous_hook(unraisable)
  sys.unraisablehook = drop_closed_loop_noise


def parse_flags(default_config: str | None,
                on_error: Callable[[str, list[str]], None] | None = None) -> Callable[[list[str]], list[str]]:
  """An `app.run` flags_parser: the usual absl parsing, with each mistake printed as one line (exit 1), then
  passed to `on_error` with the command line. It also starts the command (`start_command`): a Ctrl-C that came
  while it imported ends it, and one dropped in a garbage-collection or weakref callback is sent again."""
  def parse(argv: list[str]) -> list[str]:
    start_command()
    argv = argv[:1] + _expand_config_home(argv[1:])
    try:  # loading the config file (here and in the flag parser) can take seconds, as a search config's does
      problem = check_command_line(argv[1:], default_config)
      if problem is None:
        try:
          return flags.FLAGS(argv)
        except SystemExit:  # absl's --help, --helpfull and --helpxml print and exit 1; asking for help is no error
          sys.exit(0)
        except Exception as e:  # pylint: disable=broad-except
          problem = " ".join(str(e).split())
          if "Flag --config must have a value other than None" in problem:  # a required --config left out
            problem = "--config is required: pass a config file, such as --config=configs/tiny.py"
          elif isinstance(e, flags.IllegalFlagValueError):
            problem = _bad_value(problem, argv[1:], default_config)
          elif isinstance(e, flags.Error):
            problem += " (--helpfull lists the flags)"
    except KeyboardInterrupt:
      print("\nerror: interrupted.", file=sys.stderr)
      sys.exit(130)
    print(f"error: {problem}", file=sys.stderr)
    if on_error is not None:
      on_error(f"error: {problem}", argv[1:])
    sys.exit(1)
  return parse


_interrupted_while_importing = False


def defer_interrupts_while_importing() -> None:
  """Until the command starts (`start_command`), a Ctrl-C is only noted. Raised while JAX imports, it left a
  library half-initialised (an unrelated error later), was dropped in a gc callback (the command ran on), or
  ended in a traceback from inside the import system."""
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _note_interrupt)


def _note_interrupt(signum, frame):
  global _interrupted_while_importing
  _interrupted_while_importing = True


def start_command() -> None:
  """Ends the command with one line and exit 130 if Ctrl-C came while it imported, and from now on lets Ctrl-C
  interrupt, never dropped (`keep_dropped_interrupts`)."""
  if signal.getsignal(signal.SIGINT) is _note_interrupt:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  if _interrupted_while_importing:
    print("error: interrupted.", file=sys.stderr)
    exit_now(130)
  keep_dropped_interrupts()


def keep_dropped_interrupts() -> None:
  """Makes a Ctrl-C that Python drops as unraisable interrupt the command after all. Python drops an exception
  raised in a garbage-collection callback (JAX registers one), a weakref callback or a `__del__`; during a long
  C call that allocates (such as `ast.parse`, building the built-in corpus) these are the only Python code that
  runs, so Ctrl-C was raised there, dropped, and the command ran on. A dropped one is now sent again a moment
  later, until it lands in ordinary code; other unraisable exceptions go to the hook as before."""
  if getattr(sys.unraisablehook, "resends_interrupts", False):
    return
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
      previous_hook(unraisable)
      return
    while True:
      try:
        resend = threading.Timer(0.02, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
        resend.daemon = True
        resend.start()
        return
      except KeyboardInterrupt:  # a busy machine kept this thread in start() past the delay: the resent one landed
        pass                     # here, where it would be dropped too, so it is sent once more
  hook.resends_interrupts = True
  sys.unraisablehook = hook


def use_compilation_cache(config) -> None:
  """JAX's persistent compilation cache in config.train.compilation_cache_dir ("" leaves it alone): a rerun, a
  resumed run, another seed of the same model, an evaluation or a generation loads its programs instead of
  compiling them again. ConfigError if the directory cannot be made or written (JAX would only warn, and
  compile every program again)."""
  if config.train.compilation_cache_dir:
    import jax
    path = os.path.abspath(os.path.expanduser(config.train.compilation_cache_dir))
    try:
      os.makedirs(path, exist_ok=True)
      why = None if os.access(path, os.W_OK | os.X_OK) else "it is not writable by this user"
    except OSError as e:
      why = "it or a directory above it is a file" if isinstance(e, (FileExistsError, NotADirectoryError)) else (
          e.strerror or str(e))
    if why:
      raise config_lib.ConfigError(f"config.train.compilation_cache_dir: {path} cannot hold the compiled programs "
                                   f"({why}); set it to a directory you can write, or to '' to use none.")
    jax.config.update("jax_compilation_cache_dir", path)


@contextlib.contextmanager
def cache_hits():
  """A list that, after the block, is not empty if the block loaded a program from the persistent compilation
  cache instead of compiling it (JAX's "/jax/compilation_cache/cache_hits" events, several for one program)."""
  import jax
  hits = []
  listener = lambda event, **kwargs: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None
  jax.monitoring.register_event_listener(listener)
  try:
    yield hits
  finally:
    jax.monitoring.unregister_event_listener(listener)


def refuse_arguments(argv: list[str], hint: str = "settings are flags, such as --config.train.run_steps=10") -> None:
  """Exits with one line if the command line holds words that are not flags (absl would print all its help)."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; {hint}.", file=sys.stderr)
    sys.exit(1)


def interruptible(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main`, with Ctrl-C ending the command in one line and exit 130 instead of a traceback, and a reader
  that closes the output early (`| head`) ending it quietly with 141, as SIGPIPE ends other programs."""
  def run(argv):
    try:
      main(argv)
    except KeyboardInterrupt:
      print("\nerror: interrupted.", file=sys.stderr)
      exit_now(130)
    except BrokenPipeError:
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the final flush has nowhere else to go
      exit_now(141)
  return run


def exit_now(code: int) -> None:
  """Exits without waiting for Orbax's writer threads, which a failed or interrupted save can leave
  waiting forever."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access
