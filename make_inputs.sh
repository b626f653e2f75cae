#!/usr/bin/env bash
# Makes the Data Pipelines document's prompts: DIR/shard_K.txt, PER_SHARD lines each,
# "What is two times N?" for N = 0, 1, 2, ... Running it twice gives the same files.
#
#   ./make_inputs.sh [DIR] [SHARDS] [PER_SHARD]      (defaults: inputs 10 3)
set -euo pipefail
dir=${1:-inputs} shards=${2:-10} per_shard=${3:-3}
for n in "$shards" "$per_shard"; do
    [[ $n =~ ^[0-9]+$ ]] || { echo "make_inputs.sh: error: SHARDS and PER_SHARD must be whole numbers, got '$n'" >&2; exit 2; }
done
mkdir -p "$dir"
for ((shard = 0; shard < shards; shard++)); do
    # ">" (not ">>"): each file is written whole, so a second run gives the same files.
    awk -v shard="$shard" -v n="$per_shard" \
        'BEGIN { for (i = 0; i < n; i++) printf "What is two times %d?\n", shard * n + i }' > "$dir/shard_$shard.txt"
done
echo "make_inputs.sh: wrote $shards files of $per_shard prompts to $dir/"
