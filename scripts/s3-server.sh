#!/usr/bin/env bash
# A real S3 endpoint for the object-store tests and benchmark (issue 13): a single-host Ceph
# cluster (one monitor, one manager, one OSD, one RADOS Gateway) from Debian's packages, on
# this machine's loopback, its data in memory (memstore) or a file (bluestore), its state in
# one directory.
#
#   bash scripts/s3-server.sh install   install Debian's Ceph packages where missing (apt-get)
#   bash scripts/s3-server.sh start     start it (idempotent: a running one is left alone)
#   bash scripts/s3-server.sh env       print the variables a client needs (eval "$(... env)")
#   bash scripts/s3-server.sh status    exit 0 if the gateway answers, 1 if not (reason on stderr)
#   bash scripts/s3-server.sh stop      stop every daemon and remove the state directory
#
# install and start exit 3 with the reason on stderr when Ceph's packages are not installed
# and cannot be (a machine without Debian's Ceph: the tests then skip, naming that reason), 1
# when a daemon does not come up (its log's tail is shown).
#
# Env: PLM_S3_DIR (state; default /tmp/pylazymem-s3), PLM_S3_ADDR (the address the gateway
# listens on; default 127.0.0.1; tests in other network namespaces need one they can reach),
# PLM_S3_PORT (default 7480), PLM_S3_MON_PORT (msgr v1 port; default 6789),
# PLM_S3_STORE (memstore | bluestore; default memstore), PLM_S3_STORE_BYTES (default 6 GiB).
#
# Why by hand and not cephadm or vstart.sh: cephadm needs containers and systemd, vstart.sh is
# not packaged; the daemons below are what Debian's packages ship, started as plain processes
# (root) with authentication off: the cluster listens on loopback only and lives for one run.
set -euo pipefail

DIR="${PLM_S3_DIR:-/tmp/pylazymem-s3}"
ADDR="${PLM_S3_ADDR:-127.0.0.1}"
PORT="${PLM_S3_PORT:-7480}"
MON_PORT="${PLM_S3_MON_PORT:-6789}"
STORE="${PLM_S3_STORE:-memstore}"
STORE_BYTES="${PLM_S3_STORE_BYTES:-$((6 << 30))}"
CONF="$DIR/ceph.conf"
# Fixed test credentials: the gateway is reachable from this machine only, and lives for a run.
ACCESS_KEY="PYLAZYMEMTESTKEY0001"
SECRET_KEY="pylazymem-test-secret-key-0000000000000001"
USER_ID="pylazymem"

die() { echo "s3-server.sh: $*" >&2; exit 1; }

missing_packages() {
    local m=()
    for b in ceph-mon ceph-mgr ceph-osd radosgw radosgw-admin ceph monmaptool; do
        command -v "$b" >/dev/null 2>&1 || m+=("$b")
    done
    [ ${#m[@]} -eq 0 ] || echo "${m[*]}"
}

endpoint() { echo "http://$ADDR:$PORT"; }

gateway_answers() {
    # An anonymous GET of the service: RGW answers with a ListAllMyBucketsResult (or an
    # AccessDenied document): any HTTP answer means the gateway is up.
    python3 - "$(endpoint)" <<'EOF'
import sys, urllib.request, urllib.error
try:
    urllib.request.urlopen(sys.argv[1] + "/", timeout=2).read()
except urllib.error.HTTPError:
    pass
except Exception as e:
    sys.exit(1)
EOF
}

show_log() {
    local f="$DIR/log/$1.log"
    [ -f "$f" ] && { echo "--- tail of $f" >&2; tail -n 25 "$f" >&2; }
    return 0
}

wait_for() {   # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
    local secs="$1" what="$2"; shift 2
    local end=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.5
    done
}

write_conf() {
    local fsid="$1"
    cat > "$CONF" <<EOF
[global]
fsid = $fsid
mon host = v1:127.0.0.1:$MON_PORT
ms bind msgr2 = false
auth cluster required = none
auth service required = none
auth client required = none
run dir = $DIR/run
log file = $DIR/log/\$name.log
admin socket = $DIR/run/\$name.asok
pid file = $DIR/run/\$name.pid
# one OSD: every pool has one copy, few placement groups (RGW creates about 8 pools)
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 1
mon data avail crit = 0
osd objectstore = $STORE
memstore device bytes = $STORE_BYTES
bluestore block create = true
bluestore block size = $STORE_BYTES
osd memory target = 1073741824
# the crush entry is made by this script before the OSD starts; the OSD's own update at start
# is a monitor command sent before it has the monitor map, with a zero fsid, which the
# monitor refuses ("wrong fsid": the OSD then exits), in about one start out of three here
osd crush update on start = false
osd class update on start = false
[mon.a]
mon data = $DIR/$fsid/mon/a
[mgr.x]
mgr data = $DIR/$fsid/mgr/x
[osd.0]
osd data = $DIR/$fsid/osd/0
[client.rgw.a]
rgw frontends = beast endpoint=$ADDR:$PORT
rgw data = $DIR/$fsid/rgw/a
rgw dns name = $ADDR
EOF
}

PACKAGES=(ceph-mon ceph-mgr ceph-osd radosgw ceph-common)

cmd_install() {
    [ -z "$(missing_packages)" ] && return 0
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "s3-server.sh: Ceph is not installed and this machine has no apt-get (Debian's packages: ${PACKAGES[*]})" >&2
        exit 3
    fi
    local SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "s3-server.sh: installing ${PACKAGES[*]} with apt-get" >&2
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    if ! apt-cache show radosgw >/dev/null 2>&1; then
        echo "s3-server.sh: this machine's package sources have no Ceph (radosgw); Debian 12 ships Ceph 16.2" >&2
        exit 3
    fi
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${PACKAGES[@]}" >/dev/null || die "apt-get install ${PACKAGES[*]} failed"
}

cmd_start() {
    local miss
    miss="$(missing_packages)"
    if [ -n "$miss" ]; then
        echo "s3-server.sh: Ceph is not installed (missing: $miss); on Debian: apt-get install ceph-mon ceph-mgr ceph-osd radosgw ceph-common" >&2
        exit 3
    fi
    if [ -f "$CONF" ] && gateway_answers; then
        echo "s3-server.sh: already running at $(endpoint) (state in $DIR)"
        return 0
    fi
    # A fresh cluster from nothing, up to three times: a loaded machine has failed single
    # steps of a start (the monitor refusing `osd new` with EPERM just after it started; the
    # OSD's start-time crush update, now off in the configuration: "wrong fsid"), and a start
    # again from nothing succeeded each time. Each attempt runs in a subshell: its `die` ends
    # only it, and its EXIT trap stops what it started. (Not as an `if` condition: there bash
    # ignores `set -e` inside, and a failing step would not end the attempt.)
    local attempt rc
    for attempt in 1 2 3; do
        set +e
        (set -e; start_once)
        rc=$?
        set -e
        [ "$rc" -eq 0 ] && return 0
        echo "s3-server.sh: start attempt $attempt of 3 failed (above)" >&2
        cmd_stop quiet
        sleep 2
    done
    die "the gateway did not start in 3 attempts"
}

start_once() {
    cmd_stop quiet
    # another cluster (or anything) on our ports would answer our commands: refuse, loudly
    local p
    for p in "$MON_PORT" "$PORT"; do
        if port_taken "$p"; then
            die "port $p is in use on this machine (another gateway or Ceph monitor?); set PLM_S3_MON_PORT / PLM_S3_PORT"
        fi
    done
    # a start that fails leaves nothing running (test.sh stops only a gateway that came up)
    trap 'cmd_stop quiet' EXIT
    local fsid
    fsid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
    # The daemons' data under a directory of this cluster's own: a daemon of an earlier
    # cluster still going down (a memstore OSD writes its store out when it stops) cannot
    # write into this one's.
    mkdir -p "$DIR"/{run,log} "$DIR/$fsid"/{mon/a,mgr/x,osd/0,rgw/a}
    write_conf "$fsid"

    # monitor
    monmaptool --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$MON_PORT]" "$DIR/monmap" >/dev/null
    ceph-authtool --create-keyring "$DIR/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-mon -c "$CONF" --mkfs -i a --monmap "$DIR/monmap" --keyring "$DIR/mon.keyring" \
        || { show_log mon.a; die "ceph-mon --mkfs failed"; }
    ceph-mon -c "$CONF" -i a || { show_log mon.a; die "ceph-mon did not start"; }
    wait_for 30 "the monitor" ceph -c "$CONF" --connect-timeout 2 mon stat \
        || { show_log mon.a; die "the monitor does not answer"; }
    [ "$(ceph -c "$CONF" --connect-timeout 2 fsid 2>/dev/null)" = "$fsid" ] \
        || die "the monitor at 127.0.0.1:$MON_PORT is another cluster's"

    # manager (pool commands of radosgw-admin and the health report go through it)
    ceph-mgr -c "$CONF" -i x || { show_log mgr.x; die "ceph-mgr did not start"; }

    # one OSD
    local osd_uuid
    osd_uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
    # retried: a monitor that has just started can refuse it ("EPERM: problem getting command
    # descriptions from mon", seen once on a loaded machine); with its uuid it is idempotent
    wait_for 30 "the OSD's id" ceph -c "$CONF" --connect-timeout 2 osd new "$osd_uuid" 0 \
        || { ceph -c "$CONF" --connect-timeout 2 osd new "$osd_uuid" 0 >/dev/null; die "ceph osd new failed"; }
    ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$osd_uuid" >/dev/null 2>&1 \
        || { show_log osd.0; die "ceph-osd --mkfs failed"; }
    ceph -c "$CONF" osd crush add-bucket localhost host >/dev/null 2>&1
    ceph -c "$CONF" osd crush move localhost root=default >/dev/null 2>&1
    ceph -c "$CONF" osd crush add osd.0 1.0 host=localhost >/dev/null 2>&1
    ceph-osd -c "$CONF" -i 0 2>>"$DIR/log/osd.0.stderr" || { show_log osd.0; die "ceph-osd did not start"; }
    wait_for 60 "the OSD" osd_up || { show_log osd.0; die "osd.0 did not come up"; }

    # the gateway and its user
    radosgw -c "$CONF" -n client.rgw.a || { show_log client.rgw.a; die "radosgw did not start"; }
    wait_for 120 "the gateway" gateway_answers \
        || { show_log client.rgw.a; die "the gateway does not answer at $(endpoint)"; }
    radosgw-admin -c "$CONF" user create --uid="$USER_ID" --display-name="pylazymem tests" \
        --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" >/dev/null \
        || die "radosgw-admin user create failed"
    trap - EXIT
    echo "s3-server.sh: RADOS Gateway at $(endpoint) (Ceph $(ceph --version | awk '{print $3}'), $STORE, state in $DIR)"
}

port_taken() {
    python3 -c 'import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"
}

osd_up() {
    ceph -c "$CONF" --connect-timeout 2 osd dump 2>/dev/null | grep -q '^osd.0 up'
}

cmd_stop() {
    local quiet="${1:-}"
    if [ -d "$DIR/run" ]; then
        for pidf in "$DIR"/run/*.pid; do
            [ -f "$pidf" ] || continue
            local pid
            pid="$(cat "$pidf" 2>/dev/null || true)"
            [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
        done
        # the daemons flush and exit within seconds; then no survivor is left behind
        for _ in $(seq 1 20); do
            local alive=0
            for pidf in "$DIR"/run/*.pid; do
                [ -f "$pidf" ] || continue
                kill -0 "$(cat "$pidf" 2>/dev/null || echo 0)" 2>/dev/null && alive=1
            done
            [ $alive -eq 0 ] && break
            sleep 0.25
        done
        for pidf in "$DIR"/run/*.pid; do
            [ -f "$pidf" ] || continue
            kill -9 "$(cat "$pidf" 2>/dev/null || echo 0)" 2>/dev/null || true
        done
    fi
    # a daemon that never wrote its pid file (killed while starting) is ours by its config
    if [ -f "$CONF" ] && pkill -9 -f -- "-c $CONF" 2>/dev/null; then
        sleep 0.5
    fi
    # killed is not yet gone: a process with much memory keeps its sockets while it is torn
    # down; the next start needs the ports
    if [ -f "$CONF" ]; then
        for _ in $(seq 1 40); do
            pgrep -f -- "-c $CONF" >/dev/null 2>&1 || break
            sleep 0.25
        done
    fi
    rm -rf "$DIR"
    [ -n "$quiet" ] || echo "s3-server.sh: stopped"
}

cmd_env() {
    [ -f "$CONF" ] || die "not started (bash scripts/s3-server.sh start)"
    echo "export AWS_ACCESS_KEY_ID=$ACCESS_KEY"
    echo "export AWS_SECRET_ACCESS_KEY=$SECRET_KEY"
    echo "export AWS_ENDPOINT_URL=$(endpoint)"
    echo "export AWS_DEFAULT_REGION=us-east-1"
}

cmd_status() {
    [ -f "$CONF" ] || { echo "s3-server.sh: not started" >&2; exit 1; }
    gateway_answers || { echo "s3-server.sh: the gateway at $(endpoint) does not answer" >&2; exit 1; }
    echo "s3-server.sh: up at $(endpoint)"
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) echo "usage: $0 install|start|stop|env|status" >&2; exit 2 ;;
esac
