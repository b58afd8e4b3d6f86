#!/usr/bin/env bash
# CI step 1: what a newcomer does, in a clean folder: a fresh clone, the README's plain install
# and start command, offline weights registered under their official URL, the README's first job
# (plus an OME-TIFF slide and a QuPath body with checkpoint_url), then --once. Fails on any miss.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/samwatch-first-run.XXXXXX")"
daemon=""
cleanup() {
  [ -n "$daemon" ] && kill "$daemon" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
say() { echo "first-run: $*" >&2; }
fail() { say "FAILED: $*"; [ -f "$work/samwatch/daemon.log" ] && tail -n 40 "$work/samwatch/daemon.log" >&2; exit 1; }
wait_for() {  # SECONDS DESCRIPTION COMMAND...
  local deadline=$(( $(date +%s) + $1 )) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "timed out waiting for $what"
    kill -0 "$daemon" 2>/dev/null || fail "the daemon exited while waiting for $what"
    sleep 1
  done
}
state_is() { grep -Eq "\"state\": *\"$2\"" "outbox/$1.progress.json"; }

git clone --quiet "$repo" "$work/samwatch"
cd "$work/samwatch"
say "plain install"
./install.sh
say "start: .venv/bin/samwatch run"
.venv/bin/samwatch run >daemon.log 2>&1 &
daemon=$!
wait_for 120 "outbox/_samwatch/status.json" test -s outbox/_samwatch/status.json

url=https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt
.venv/bin/python "$repo/.ci/random_vit_t.py" "$work/mobile_sam.pt"
.venv/bin/samwatch weights add mobile_sam vit_t "$work/mobile_sam.pt" --url "$url"
.venv/bin/python "$repo/.ci/make_first_images.py" inbox
cat > inbox/my_cells.yaml <<'YAML'
model: vit_t
label: nucleus
prompts:
  - bbox: [120, 80, 210, 170]
  - points: [[300, 240], [320, 260]]
    point_labels: [1, 0]
YAML
echo '{"type": "vit_t", "bbox": [120, 80, 210, 170], "checkpoint_url": "'"$url"'"}' > inbox/my_cells.qupath.json
printf 'model: vit_t\nprompts:\n  - bbox: [100, 60, 240, 200]\n' > inbox/slide.yaml
for job in my_cells my_cells.qupath slide; do
  wait_for 300 "$job done" state_is "$job" "(done|failed)"
  state_is "$job" done || fail "$job: $(cat "outbox/$job.error.json" 2>/dev/null)"
done
.venv/bin/python - <<'PY' || fail "the first result is not what the README says"
import json
meta = json.load(open("outbox/my_cells.geojson"))["samwatch"]
assert meta["image_encoder"] == "onnxruntime", meta["image_encoder"]  # the CPU default, plain install
print("first-run: my_cells.geojson:", meta["model"], meta["weights"]["name"], meta["image_encoder"])
PY
.venv/bin/samwatch status >&2
kill -TERM "$daemon"
rc=0; wait "$daemon" || rc=$?
daemon=""
[ "$rc" = 0 ] || fail "SIGTERM: the daemon exited $rc, not 0"

say "samwatch run --once"
printf 'model: vit_t\nprompts:\n  - bbox: [40, 180, 130, 280]\n' > inbox/my_cells.again.yaml
.venv/bin/samwatch run --once >>daemon.log 2>&1 || fail "run --once exited $?"
state_is my_cells.again done || fail "--once left my_cells.again unfinished"
say "ok"
