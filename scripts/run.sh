#!/usr/bin/env bash
# README command 1: build shadowgate and the demo origins, start the origins that
# conf/shadowgate.yaml expects, then run the proxy in the foreground. Ctrl-C stops it all.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

CONFIG=conf/shadowgate.yaml
PROXY=127.0.0.1:8080
METRICS=127.0.0.1:9091

sg_ensure_prerequisites
cargo build --release --bin shadowgate --example demo_origin
target/release/shadowgate -t -c "$CONFIG"

for addr in $PROXY $METRICS 127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003 127.0.0.1:9004; do
    if sg_listening "$addr"; then
        sg_say "$addr is already in use (another shadowgate or demo origin running?); stop it first"
        exit 1
    fi
done

origins=()
stop_origins() {
    [ ${#origins[@]} -gt 0 ] && kill "${origins[@]}" 2>/dev/null
    wait "${origins[@]}" 2>/dev/null || true
}
trap stop_origins EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The pools of conf/shadowgate.yaml: app (live), app-v2 (the candidate, shadow only,
# drifting on one field) and app-control (the current version again, for the noise floor).
target/release/examples/demo_origin app 127.0.0.1:9001 127.0.0.1:9002 &
origins+=($!)
target/release/examples/demo_origin app-v2 127.0.0.1:9003 --drift &
origins+=($!)
target/release/examples/demo_origin app-control 127.0.0.1:9004 &
origins+=($!)

for addr in 127.0.0.1:9001 127.0.0.1:9002 127.0.0.1:9003 127.0.0.1:9004; do
    for _ in $(seq 100); do
        sg_listening "$addr" && break
        sleep 0.05
    done
    sg_listening "$addr" || { sg_say "demo origin on $addr did not start"; exit 1; }
done

cat <<TIPS

shadowgate is starting on http://$PROXY (config $CONFIG). Try, in another terminal:

  curl -i http://$PROXY/api/hello              # route api -> app; 25% also mirrored to app-v2
  curl -i -d 'some body' http://$PROXY/api/echo   # POST is mirrored too (see the config)
  curl -i http://$PROXY/                       # route default -> app, no mirror
  curl -s http://$METRICS/metrics | grep ^shadowgate_

Shadow verdicts: send some traffic, then open the report (app-v2 gets
\$.price.currency wrong in one answer of ten; \$.served_at differs everywhere):

  for i in \$(seq 400); do curl -s -o /dev/null http://$PROXY/api/items/\$i; done
  curl -s http://$METRICS/compare            # JSON
  xdg-open http://$METRICS/compare.html      # or open it in any browser

Ctrl-C stops the proxy and the demo origins.

TIPS

# The proxy runs until Ctrl-C or SIGTERM; either stops it at once (SIGINT: Pingora's fast
# shutdown), then the EXIT trap stops the origins. It is started in the background and
# waited for, so the script can pass the signal on instead of waiting for it to exit.
# The pid file and upgrade socket go to $XDG_RUNTIME_DIR/shadowgate or /tmp/shadowgate-$UID.
target/release/shadowgate -c "$CONFIG" &
proxy=$!
trap 'kill -INT "$proxy" 2>/dev/null || true' INT TERM
status=0
wait "$proxy" || status=$?
# A trapped signal ends `wait` early: wait again until the proxy has really exited.
while kill -0 "$proxy" 2>/dev/null; do
    status=0
    wait "$proxy" || status=$?
done
exit "$status"
