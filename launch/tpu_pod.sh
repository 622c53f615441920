#!/usr/bin/env bash
# Train on every worker of a Cloud TPU VM slice (v4-32, v5p-64, ...): copies this checkout to each worker,
# installs it with jax[tpu], then starts the same command on all workers at once. JAX reads the slice's
# workers from the TPU VM metadata (--distributed=on); each worker feeds its own rows of every batch.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [more diffmoe_jax.main flags...]
#   launch/tpu_pod.sh my-v4-32 us-central2-b configs/pi_s.py /mnt/runs/pi_s --config.train.log_every=50
#
# WORKDIR must be one directory every worker sees (a gcsfuse or NFS mount): all workers write their parts
# of each checkpoint there. Rerunning the script resumes from the newest checkpoint. Set PROJECT to pass
# --project to gcloud. The workers need Python >= 3.11; images whose python3 is older (Ubuntu 22.04 has
# 3.10) need one installed, named by PYTHON (e.g. PYTHON=python3.11). The training runs in the foreground
# of the ssh sessions: start the script inside tmux or screen.
set -euo pipefail

if [ "$#" -lt 4 ]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [more diffmoe_jax.main flags...]" >&2
  exit 2
fi
tpu_name=$1
zone=$2
config=$3
workdir=$4
shift 4

repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
remote_dir="diffmoe_jax"  # in each worker's home directory
# A relative WORKDIR would land inside remote_dir, which the next launch deletes with its checkpoints, and so
# would one in this checkout where it lies at the same path on the workers (~/diffmoe_jax, gcloud's user).
case "$workdir" in
  "$repo_dir" | "$repo_dir"/*)
    echo "error: WORKDIR $workdir lies in this checkout, whose copy each launch replaces on the workers; pass a" \
         "directory every worker mounts, such as /mnt/runs/pi_s" >&2
    exit 2 ;;
  /*) ;;
  *) echo "error: WORKDIR $workdir must be an absolute path every worker mounts, such as /mnt/runs/pi_s" >&2; exit 2 ;;
esac
if ! git -C "$repo_dir" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  echo "error: $repo_dir is not a git checkout, and the workers get the files git lists in it; run the script" \
       "from a clone of the repository" >&2
  exit 2
fi
case "$config" in
  "$repo_dir"/*) config=${config#"$repo_dir"/} ;;  # a file of this checkout (tab-completed, say): the copy's
esac
case "$config" in
  /*) ;;  # a path on the workers
  *) if [ ! -f "$repo_dir/$config" ]; then
       echo "error: CONFIG $config is not a file of this checkout ($repo_dir); pass a path such as configs/pi_s.py" >&2
       exit 2
     fi
     if git -C "$repo_dir" check-ignore -q -- "$config"; then  # (a tracked file is never reported)
       echo "error: CONFIG $config is ignored by git, so the workers' copy would not hold it; move it, or add it" \
            "with git add -f" >&2
       exit 2
     fi ;;
esac
python="${PYTHON:-python3}"
gcloud_args=(--zone="$zone" --worker=all)
if [ -n "${PROJECT:-}" ]; then
  gcloud_args+=(--project="$PROJECT")
fi

# The checkout as git sees it (tracked and untracked files, nothing ignored such as runs/), less tracked
# files deleted locally.
archive="$(mktemp -d)/diffmoe_jax.tar.gz"
trap 'rm -rf "$(dirname "$archive")"' EXIT
git -C "$repo_dir" ls-files --cached --others --exclude-standard -z \
  | while IFS= read -r -d '' f; do if [ -e "$repo_dir/$f" ]; then printf '%s\0' "$f"; fi; done \
  | tar -C "$repo_dir" --null -T - -czf "$archive"
gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:diffmoe_jax.tar.gz" "${gcloud_args[@]}"

install="$python -c 'import sys; sys.exit(sys.version_info < (3, 11))'"
install+=" || { echo \"\$(hostname): $python is older than Python 3.11; set PYTHON to a newer one\" >&2; exit 1; }"
install+=" && rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf diffmoe_jax.tar.gz -C $remote_dir"
install+=" && $python -m pip install -q -U 'jax[tpu]' && $python -m pip install -q ./$remote_dir"
gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_args[@]}" --command="$install"

train="$(printf '%q ' "$python" -m diffmoe_jax.main --distributed=on --config="$config" --workdir="$workdir" "$@")"
gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_args[@]}" --command="cd $remote_dir && $train"
