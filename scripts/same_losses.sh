#!/usr/bin/env bash
# Refactoring check: do two commits train bit for bit the same? Trains, at each commit, the default
# run (1,500 steps), a CoCa run (200 steps; the default recipe with a two-layer decoder) and a LiT
# run (200 steps; the image tower taken from the default run's workdir and frozen), all with
# --config.log_every_steps=1, and compares every step's loss, gradient norm, learning rate,
# temperature, accuracies and loss terms, and every evaluation, between the two.
#
#   scripts/same_losses.sh BEFORE [AFTER]      (commits; AFTER defaults to HEAD)
#
# About 3 minutes per commit on an idle 2-core machine. Exits 1 if any run differs.
set -euo pipefail
if [[ $# -lt 1 ]]; then sed -n '2,10p' "$0"; exit 2; fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python}"
scratch="$(mktemp -d)"
trap 'git -C "$repo" worktree remove --force "$scratch/before" 2>/dev/null; git -C "$repo" worktree remove --force "$scratch/after" 2>/dev/null; rm -rf "$scratch"' EXIT

# The CoCa recipe as a file, so the same one works at commits that cannot set a decoder by flag.
cat > "$scratch/coca_tiny.py" <<'PY'
import importlib.util, os
def get_config():
    spec = importlib.util.spec_from_file_location("default_recipe", os.path.join(os.getcwd(), "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.loss.name = "coca"
    config.model.overrides.decoder = {"width": 64, "heads": 2, "layers": 2}
    return config
PY

for side in before after; do
  revision=$1; [[ $side == after ]] && revision=${2:-HEAD}
  git -C "$repo" worktree add --detach --force "$scratch/$side" "$revision" > /dev/null
  out="$scratch/runs/$side"; mkdir -p "$out"
  echo "training at $side ($(git -C "$scratch/$side" log --oneline -1 | cut -c1-60))"
  (cd "$scratch/$side" &&
    "$python" train.py --workdir "$out/default" --config.log_every_steps=1 > "$out/default.log" 2>&1 &&
    "$python" train.py --config "$scratch/coca_tiny.py" --workdir "$out/coca" --config.log_every_steps=1 \
      --config.total_steps=200 > "$out/coca.log" 2>&1 &&
    "$python" train.py --workdir "$out/lit" --config.log_every_steps=1 --config.total_steps=200 \
      --config.init.checkpoint="$out/default" --config.init.regex='^visual/' \
      --config.optimizer.freeze_regex='^visual/' > "$out/lit.log" 2>&1) ||
    { echo "a run failed at $side: see the logs in $out (kept)"; trap - EXIT; exit 1; }
done

"$python" - "$scratch/runs" <<'PY'
import json, sys
KEPT = ("loss", "grad_norm", "learning_rate", "logit_scale", "accuracy_image_to_text", "accuracy_text_to_image")
def records(path):
    steps, evaluations = {}, {}
    for line in open(path):
        record = json.loads(line)
        if "loss" in record:
            steps[record["step"]] = {k: v for k, v in record.items() if k in KEPT or k.endswith("_loss")}
        evaluation = {k: v for k, v in record.items() if k.startswith("zero_shot/")}
        if evaluation:
            evaluations[record["step"]] = evaluation
    return steps, evaluations
same = True
for run in ("default", "coca", "lit"):
    (a, ea), (b, eb) = (records(f"{sys.argv[1]}/{side}/{run}/metrics.jsonl") for side in ("before", "after"))
    differ = sorted(step for step in a.keys() | b.keys() if a.get(step) != b.get(step))
    same &= not differ and ea == eb and len(a) > 0
    print(f"{run}: {len(a)} steps and {len(ea)} evaluations before, {len(b)} and {len(eb)} after: "
          + ("bitwise the same" if not differ and ea == eb else f"differ (steps {differ[:5]}, evaluations {'same' if ea == eb else 'differ'})"))
sys.exit(0 if same else 1)
PY
