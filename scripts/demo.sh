#!/usr/bin/env bash
# `make demo` (and `make study`): a profile through the deployment aot/train-eval, on local services
# unless real endpoints are set (PREFECT_API_URL, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL). Everything
# stays up for browsing; `make down` stops what `aot services up` started. DEMO_PARAMS (a params
# file or a profile in configs/, default params.yaml), DEMO_OUT (the work folder, default demo) and
# DEMO_OVERRIDES (JSON, default: checkpoints copied to the bucket), e.g.
# DEMO_OVERRIDES='{"train.duration_kimg": 30}'.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false
SECONDS=0

"$BIN/aot" services up --worker
eval "$("$BIN/aot" services env)"
echo "[demo] services ready after ${SECONDS} s" >&2

"$BIN/prefect" --no-prompt deploy --all >/dev/null
echo "[demo] deployment aot/train-eval registered after ${SECONDS} s" >&2

PARAMS=${DEMO_PARAMS:-params.yaml} OUT=${DEMO_OUT:-demo}
mkdir -p "$OUT"
log=$OUT/prefect-flow-run.log
default_overrides=$(printf '{"tracking.checkpoint_url": "s3://%s/checkpoints"}' "${AOT_S3_BUCKET:-aot-diffusion}")
"$BIN/prefect" deployment run aot/train-eval --param params="$PARAMS" --param out="$OUT" \
    --param overrides="${DEMO_OVERRIDES:-$default_overrides}" --watch | tee "$log"
echo "[demo] flow run finished after ${SECONDS} s" >&2
flow_run=$(grep -oE 'UUID: [0-9a-f-]{36}' "$log" | head -1 | cut -d' ' -f2)

cat "$OUT/report/report.md"
echo
echo "Where to look (services stay up; \`make down\` stops them):"
"$BIN/python" scripts/ui_links.py "$flow_run"
