#!/usr/bin/env bash
# pylazymem's Docker harness: build the test image from this source tree and run the privilege
# matrix, one container per case, each with its expected outcome asserted.
#
#   bash docker/run-matrix.sh [--only 1,2,3,3b,4] [--rebuild-base] [--refresh-wheels]
#                             [--stop-daemon] [--no-pytest]
#
# On a Debian-like machine, as root (or a user with sudo), with access to Debian's archive and
# PyPI on the host only. It
#   1. installs the engine if there is none (Debian's docker.io, with apt-get);
#   2. starts dockerd if it is not running (systemctl where systemd runs, else by hand in the
#      background with its log in docker/out/dockerd.log; no bridge network, no iptables);
#   3. makes the base images if they are missing: debootstrap a minimal Debian (the host's
#      release, or bookworm) with python3, docker import it as pylazymem-base:REL, add the
#      compiler and headers in a chroot, import that as pylazymem-base:REL-build;
#   4. fills docker/wheelhouse/ on the host (pip download) for the base image's Python version
#      and platform: the build and test dependencies from pyproject.toml;
#   5. builds the Dockerfile with --network none: the wheel is compiled from source inside the
#      build stage, the test stage installs it offline;
#   6. runs the matrix (every container with --network none; /dev/kvm passed with the device
#      where it exists):
#        1  root, --device /dev/userfaultfd               full mode; the test suite passes
#        2  unprivileged user, --device /dev/userfaultfd  full mode; the test suite passes
#        3  unprivileged user, no device, seccomp profile allowing userfaultfd
#           (Docker's default + userfaultfd), vm.unprivileged_userfaultfd=0
#                                                         user-mode-only; os.write() from a lazy
#                                                         page fails with EFAULT; kernel-access
#                                                         tests skip; the suite passes
#        3b as 3 with the repository's docker/seccomp-userfaultfd.json (no test suite)
#        4  root, default seccomp profile, no device      unavailable: "blocked by seccomp" and
#                                                         the run flags that fix it; Region()
#                                                         raises UnavailableError with them
# It prints each case's digest and a summary table with timings, keeps full logs in
# docker/out/, and exits non-zero if any step or expectation failed.
#
# Environment: PYLAZYMEM_DOCKER_RELEASE (Debian release of the base image), PYLAZYMEM_DOCKER_MIRROR
# (Debian mirror for debootstrap), PYLAZYMEM_DOCKER_OUT (log directory), PYLAZYMEM_DOCKERD_ARGS
# (arguments for a dockerd started by hand; default "--bridge=none --iptables=false"),
# PYLAZYMEM_MATRIX_PYTEST_ARGS (extra pytest arguments for the suite in the containers).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
OUT=${PYLAZYMEM_DOCKER_OUT:-$HERE/out}
WHEELHOUSE=$HERE/wheelhouse
CASES="1,2,3,3b,4"
REBUILD_BASE=0
REFRESH_WHEELS=0
STOP_DAEMON=0
PYTEST=1

usage() { sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --only) CASES=$2; shift ;;
        --only=*) CASES=${1#*=} ;;
        --rebuild-base) REBUILD_BASE=1 ;;
        --refresh-wheels) REFRESH_WHEELS=1 ;;
        --stop-daemon) STOP_DAEMON=1 ;;
        --no-pytest) PYTEST=0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run-matrix.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

mkdir -p "$OUT"
T_START=$(date +%s.%N)
ROWS=()
FAILED=0
N_PASS=0
N_FAIL=0
STARTED_DAEMON=0
CLEANUP=()

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
log() { printf '[matrix %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
row() { ROWS+=("$(printf '%-52s %7s  %s' "$1" "$2" "$3")"); }

summary() {
    echo
    echo "==================================== summary ===================================="
    printf '%-52s %7s  %s\n' "step" "seconds" "result"
    printf '%-52s %7s  %s\n' "----" "-------" "------"
    local r
    for r in "${ROWS[@]}"; do echo "$r"; done
    printf '%-52s %7s  %s\n' "total" "$(since "$T_START")" \
        "$([ "$FAILED" -eq 0 ] && echo "ALL EXPECTATIONS HELD" || echo "FAILED")"
    echo "logs: $OUT"
}

fail_step() {   # name, seconds, message, [log file]: record a failed step and stop
    FAILED=1
    row "$1" "$2" "FAILED: $3"
    log "ERROR: $1: $3"
    if [ -n "${4:-}" ] && [ -f "$4" ]; then
        echo "---- last lines of $4 ----"
        tail -n 30 "$4"
        echo "----"
    fi
    summary
    exit 1
}

cleanup() {
    local c
    for c in "${CLEANUP[@]}"; do eval "$c" || true; done
    if [ "$STARTED_DAEMON" -eq 1 ] && [ "$STOP_DAEMON" -eq 1 ]; then
        stop_daemon
    fi
}
trap cleanup EXIT

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "run-matrix.sh: run as root (or install sudo)" >&2; exit 2; }
    SUDO="sudo"
fi

APT_UPDATED=0
apt_install() {   # packages...; output to $OUT/apt.log
    if ! command -v apt-get >/dev/null 2>&1; then
        log "ERROR: need $* but there is no apt-get: install them by hand"
        return 1
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        $SUDO apt-get update -qq >>"$OUT/apt.log" 2>&1 || return 1
        APT_UPDATED=1
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >>"$OUT/apt.log" 2>&1
}

# ---- 1. engine ------------------------------------------------------------------------------------
t=$(now)
if command -v dockerd >/dev/null 2>&1 || [ -x /usr/sbin/dockerd ] || [ -x /usr/bin/dockerd ]; then
    row "engine" "-" "present"
else
    log "no container engine: installing Debian's docker.io with apt-get"
    apt_install docker.io || fail_step "engine install (apt-get docker.io)" "$(since "$t")" \
        "apt-get install docker.io failed" "$OUT/apt.log"
    row "engine install (apt-get docker.io)" "$(since "$t")" "installed"
fi
# The engine's own client when there is one (a newer client from elsewhere may not match it).
if [ -x /usr/bin/docker ]; then DOCKER_BIN=/usr/bin/docker; else DOCKER_BIN=$(command -v docker || true); fi
[ -n "$DOCKER_BIN" ] || fail_step "engine" "-" "no docker client found"
if [ -n "$SUDO" ] && [ -w /var/run/docker.sock ]; then DSUDO=""; else DSUDO=$SUDO; fi
docker() { $DSUDO env DOCKER_BUILDKIT=0 "$DOCKER_BIN" "$@"; }

# ---- 2. daemon ------------------------------------------------------------------------------------
daemon_up() { docker info >/dev/null 2>&1; }
stop_daemon() {   # the dockerd this script started, by its pid
    local pid
    pid=$(cat "$OUT/dockerd.pid" 2>/dev/null) || return 0
    log "stopping the dockerd this script started (pid $pid)"
    $SUDO kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 100); do
        if ! $SUDO kill -0 "$pid" 2>/dev/null || [ "$($SUDO awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" = Z ]; then
            rm -f "$OUT/dockerd.pid"
            return 0
        fi
        sleep 0.2
    done
    log "dockerd $pid did not stop within 20 s"
}
t=$(now)
if daemon_up; then
    row "dockerd" "-" "already running"
else
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
        $SUDO systemctl start docker >>"$OUT/dockerd.log" 2>&1 || true
    fi
    if ! daemon_up; then
        if ! grep -qs cgroup /proc/mounts; then
            log "no cgroup file systems mounted: mounting them with cgroupfs-mount"
            apt_install cgroupfs-mount && $SUDO cgroupfs-mount >>"$OUT/dockerd.log" 2>&1 || true
        fi
        # A daemon that was killed (say, at the end of a session) leaves its pid file behind,
        # and dockerd refuses to start while the file names a process that still exists (a
        # zombie counts): remove it unless it names a live dockerd.
        pidf=/var/run/docker.pid
        if [ -f "$pidf" ]; then
            p=$($SUDO cat "$pidf" 2>/dev/null)
            if [ "$($SUDO cat "/proc/$p/comm" 2>/dev/null)" != dockerd ] \
                    || [ "$($SUDO awk '{print $3}' "/proc/$p/stat" 2>/dev/null)" = Z ]; then
                log "removing the stale $pidf (pid $p is not a running dockerd)"
                $SUDO rm -f "$pidf"
            fi
        fi
        dargs=${PYLAZYMEM_DOCKERD_ARGS:---bridge=none --iptables=false}
        log "starting dockerd by hand: dockerd $dargs (log: $OUT/dockerd.log)"
        # shellcheck disable=SC2086
        $SUDO sh -c "cd / && setsid dockerd $dargs >>'$OUT/dockerd.log' 2>&1 </dev/null & echo \$! >'$OUT/dockerd.pid'"
        STARTED_DAEMON=1
        dpid=$(cat "$OUT/dockerd.pid")
        for _ in $(seq 1 120); do
            daemon_up && break
            $SUDO kill -0 "$dpid" 2>/dev/null || break     # it exited: the log says why
            sleep 0.5
        done
    fi
    daemon_up || fail_step "dockerd start" "$(since "$t")" "the daemon exited or did not answer within 60 s" \
        "$OUT/dockerd.log"
    row "dockerd start" "$(since "$t")" "started ($([ "$STARTED_DAEMON" -eq 1 ] && echo by hand || echo systemctl))"
fi
log "engine: $(docker version --format 'client {{.Client.Version}}, server {{.Server.Version}}' 2>&1)"

# ---- 3. base images -------------------------------------------------------------------------------
host_release() {
    local id="" codename=""
    if [ -r /etc/os-release ]; then
        id=$(. /etc/os-release && echo "${ID:-}")
        codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    fi
    if [ "$id" = debian ] && [ -n "$codename" ]; then echo "$codename"; else echo bookworm; fi
}
host_mirror() {
    local m
    m=$(grep -hsE '^(URIs:|deb) ' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
            /etc/apt/sources.list 2>/dev/null \
        | grep -v security | grep -oE 'https?://[^ ]+/debian/?( |$)' | tr -d ' ' | head -n 1)
    if [ -z "$m" ]; then
        echo "run-matrix: cannot find a Debian mirror in /etc/apt; set PYLAZYMEM_DOCKER_MIRROR" >&2
        exit 2
    fi
    echo "$m"
}
REL=${PYLAZYMEM_DOCKER_RELEASE:-$(host_release)}
MIRROR=${PYLAZYMEM_DOCKER_MIRROR:-$(host_mirror)}
BASE=pylazymem-base:$REL
BUILD_BASE=pylazymem-base:$REL-build
IMAGE=pylazymem-test:$REL
# The core links libxxhash, libzstd and liblz4 (compressed snapshots) and libcurl (object
# stores): their runtime libraries in
# the base image, their -dev packages in the build base. The list is recorded in a label of both
# images, so that base images made before a package was added here are made again.
RUNTIME_PKGS=python3,python3-venv,libxxhash0,libzstd1,liblz4-1,libcurl4
BUILD_PKGS="gcc libc6-dev libxxhash-dev libzstd-dev liblz4-dev libcurl4-openssl-dev python3-dev"
PKGS_LABEL="$RUNTIME_PKGS $BUILD_PKGS"

import_rootfs() {   # dir tag: tar the tree into `docker import` with labels read from the tree
    local dir=$1 tag=$2 py glibc arch
    py=$($SUDO chroot "$dir" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    glibc=$($SUDO chroot "$dir" python3 -c 'import platform; print(platform.libc_ver()[1])')
    arch=$($SUDO chroot "$dir" uname -m)
    $SUDO chroot "$dir" apt-get clean
    $SUDO rm -rf "$dir"/var/lib/apt/lists/*
    $SUDO tar --numeric-owner -C "$dir" -cf - . | docker import \
        --change "LABEL org.pylazymem.python=$py org.pylazymem.glibc=$glibc org.pylazymem.arch=$arch org.pylazymem.release=$REL org.pylazymem.pkgs=\"$PKGS_LABEL\"" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8' \
        --change 'CMD ["/bin/bash"]' \
        - "$tag" >/dev/null
}

base_pkgs() { docker image inspect -f '{{index .Config.Labels "org.pylazymem.pkgs"}}' "$1" 2>/dev/null; }
if [ "$REBUILD_BASE" -eq 1 ] || ! docker image inspect "$BASE" >/dev/null 2>&1 \
        || ! docker image inspect "$BUILD_BASE" >/dev/null 2>&1 \
        || [ "$(base_pkgs "$BASE")" != "$PKGS_LABEL" ] || [ "$(base_pkgs "$BUILD_BASE")" != "$PKGS_LABEL" ]; then
    t=$(now)
    need=()
    command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
    [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]} with apt-get"
        apt_install "${need[@]}" || fail_step "install ${need[*]}" "$(since "$t")" "apt-get failed" "$OUT/apt.log"
        row "install ${need[*]} (apt-get)" "$(since "$t")" "installed"
    fi
    ROOTFS=$(mktemp -d /var/tmp/pylazymem-rootfs.XXXXXX)
    CLEANUP+=("$SUDO rm -rf '$ROOTFS'")
    t=$(now)
    log "debootstrap --variant=minbase $REL ($RUNTIME_PKGS) from $MIRROR (log: $OUT/debootstrap.log)"
    $SUDO debootstrap --variant=minbase --include="$RUNTIME_PKGS" "$REL" "$ROOTFS" "$MIRROR" \
        >"$OUT/debootstrap.log" 2>&1 \
        || fail_step "debootstrap $REL" "$(since "$t")" "debootstrap failed" "$OUT/debootstrap.log"
    row "debootstrap $REL (minbase, python3, libxxhash0, libzstd1, liblz4-1, libcurl4)" "$(since "$t")" "$(du -sh "$ROOTFS" | cut -f1)"
    t=$(now)
    import_rootfs "$ROOTFS" "$BASE" \
        || fail_step "docker import $BASE" "$(since "$t")" "docker import failed"
    row "docker import $BASE" "$(since "$t")" "$(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}')"
    t=$(now)
    log "adding $BUILD_PKGS in a chroot for the build stage (log: $OUT/chroot-apt.log)"
    $SUDO chroot "$ROOTFS" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $BUILD_PKGS" \
        >"$OUT/chroot-apt.log" 2>&1 \
        || fail_step "build base (chroot apt-get)" "$(since "$t")" "apt-get in the chroot failed" "$OUT/chroot-apt.log"
    import_rootfs "$ROOTFS" "$BUILD_BASE" \
        || fail_step "docker import $BUILD_BASE" "$(since "$t")" "docker import failed"
    row "build base: chroot apt-get + docker import" "$(since "$t")" "$BUILD_BASE"
    $SUDO rm -rf "$ROOTFS"
else
    row "base images" "-" "present: $BASE, $BUILD_BASE"
fi
label() { docker image inspect -f "{{index .Config.Labels \"org.pylazymem.$1\"}}" "$BASE"; }
PYVER=$(label python)
GLIBC=$(label glibc)
ARCH=$(label arch)
[ -n "$PYVER" ] && [ -n "$GLIBC" ] && [ -n "$ARCH" ] \
    || fail_step "base image labels" "-" "$BASE has no org.pylazymem.* labels: rerun with --rebuild-base"
log "base image: Debian $REL, Python $PYVER, glibc $GLIBC, $ARCH"

# ---- 4. wheelhouse --------------------------------------------------------------------------------
t=$(now)
PY=""
for cand in python3 "$ROOT/.venv/bin/python"; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -m pip --version >/dev/null 2>&1; then PY=$cand; break; fi
done
if [ -z "$PY" ]; then
    log "no pip on the host: installing python3-pip with apt-get"
    apt_install python3-pip || fail_step "install python3-pip" "$(since "$t")" "apt-get failed" "$OUT/apt.log"
    PY=python3
fi
# Requirements: build-system.requires + project.dependencies + the "test" extra of pyproject.toml.
REQS=$("$PY" - "$ROOT/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
try:
    import tomllib
    d = tomllib.loads(text)
    reqs = (d["build-system"]["requires"] + d["project"]["dependencies"]
            + d["project"]["optional-dependencies"]["test"])
except ImportError:            # Python < 3.11 on the host: the three lists are one-liners
    reqs = []
    for key in ("requires", "dependencies", "test"):
        m = re.search(r"^%s\s*=\s*\[(.*?)\]" % key, text, re.M | re.S)
        reqs += re.findall(r'"([^"]+)"', m.group(1)) if m else []
seen = set()
print("\n".join(r for r in reqs if not (r in seen or seen.add(r))))
EOF
) || fail_step "wheelhouse" "$(since "$t")" "cannot read the requirements from pyproject.toml"
mapfile -t REQ_LIST <<<"$REQS"
PLATFORMS=()
gmaj=${GLIBC%%.*}; gmin=${GLIBC#*.}
for ((m = gmin; m >= 5; m--)); do PLATFORMS+=(--platform "manylinux_${gmaj}_${m}_${ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_${ARCH}" --platform "manylinux2010_${ARCH}" --platform "manylinux1_${ARCH}")
ABI=cp${PYVER/./}
STAMP="python=$PYVER abi=$ABI glibc=$GLIBC arch=$ARCH reqs=$(echo "${REQ_LIST[*]}")"
HOST_PYVER=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$HOST_PYVER" != "$PYVER" ]; then
    log "note: host pip runs on Python $HOST_PYVER, the image has $PYVER; environment markers of" \
        "dependencies are evaluated for the host (pip download's limitation)"
fi
if [ "$REFRESH_WHEELS" -eq 0 ] && [ -f "$WHEELHOUSE/.stamp" ] && [ "$(cat "$WHEELHOUSE/.stamp")" = "$STAMP" ]; then
    row "wheelhouse (pip download)" "$(since "$t")" "cached: $(ls "$WHEELHOUSE"/*.whl | wc -l) wheels"
else
    rm -rf "$WHEELHOUSE"
    mkdir -p "$WHEELHOUSE"
    log "pip download for Python $PYVER ($ABI, manylinux_${gmaj}_${gmin}_$ARCH) into docker/wheelhouse: ${REQ_LIST[*]}"
    "$PY" -m pip download --disable-pip-version-check --quiet --dest "$WHEELHOUSE" \
        --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "$ABI" \
        "${PLATFORMS[@]}" "${REQ_LIST[@]}" >"$OUT/wheelhouse.log" 2>&1 \
        || fail_step "wheelhouse (pip download)" "$(since "$t")" "pip download failed" "$OUT/wheelhouse.log"
    echo "$STAMP" >"$WHEELHOUSE/.stamp"
    row "wheelhouse (pip download)" "$(since "$t")" "$(ls "$WHEELHOUSE"/*.whl | wc -l) wheels, $(du -sh "$WHEELHOUSE" | cut -f1)"
fi

# ---- 5. image ---------------------------------------------------------------------------------------
t=$(now)
log "docker build --network none -t $IMAGE (log: $OUT/build.log)"
docker build --network none -t "$IMAGE" --build-arg "BASE=$BASE" --build-arg "BUILD_BASE=$BUILD_BASE" \
    -f "$ROOT/Dockerfile" "$ROOT" >"$OUT/build.log" 2>&1 \
    || fail_step "image build (--network none)" "$(since "$t")" "docker build failed" "$OUT/build.log"
row "image build (--network none, wheel from source)" "$(since "$t")" \
    "$IMAGE, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

# ---- seccomp profiles for case 3 ------------------------------------------------------------------
REPO_PROFILE=$HERE/seccomp-userfaultfd.json
DERIVED_PROFILE=""
if [[ ",$CASES," == *",3,"* ]]; then
    t=$(now)
    pkg=golang-github-docker-docker-dev
    src=./usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json
    dl=$(mktemp -d)
    CLEANUP+=("rm -rf '$dl'")
    if command -v apt-get >/dev/null 2>&1 && (cd "$dl" && apt-get download "$pkg" >>"$OUT/apt.log" 2>&1) \
            && dpkg-deb --fsys-tarfile "$dl"/"$pkg"_*.deb | tar -xO "$src" >"$dl/default.json" 2>/dev/null \
            && "$PY" "$HERE/derive_seccomp_profile.py" "$dl/default.json" "$OUT/seccomp-default+userfaultfd.json" >/dev/null; then
        DERIVED_PROFILE=$OUT/seccomp-default+userfaultfd.json
        ver=$(basename "$dl"/"$pkg"_*.deb .deb | cut -d_ -f2)
        row "seccomp profile: Docker's default + userfaultfd" "$(since "$t")" "from $pkg $ver"
    else
        row "seccomp profile: Docker's default + userfaultfd" "$(since "$t")" "default.json not found: case 3 uses docker/seccomp-userfaultfd.json"
    fi
fi

# ---- 6. the matrix --------------------------------------------------------------------------------
KVM=()
[ -c /dev/kvm ] && KVM=(--device /dev/kvm)
SYSCTL=/proc/sys/vm/unprivileged_userfaultfd
PYTEST_ARG=()
[ "$PYTEST" -eq 1 ] && PYTEST_ARG=(--pytest)
PYTEST_ENV=()
[ -n "${PYLAZYMEM_MATRIX_PYTEST_ARGS:-}" ] && PYTEST_ENV=(-e "PYLAZYMEM_MATRIX_PYTEST_ARGS=$PYLAZYMEM_MATRIX_PYTEST_ARGS")

run_case() {   # id, title, check, pytest(0/1), docker run flags...
    local id=$1 title=$2 check=$3 with_pytest=$4 name="pylazymem-matrix-$1" logf="$OUT/case-$1.log" rc t0 res
    shift 4
    local args=()
    [ "$with_pytest" -eq 1 ] && args=("${PYTEST_ARG[@]}")
    echo
    log "case $id: $title"
    echo "    docker run --rm --network none --init $*"
    docker rm -f "$name" >/dev/null 2>&1
    t0=$(now)
    docker run --rm --pull never --network none --init --name "$name" "$@" "${PYTEST_ENV[@]}" "$IMAGE" \
        python3 /usr/local/lib/pylazymem-docker/matrix_checks.py "$check" "${args[@]}" >"$logf" 2>&1
    rc=$?
    grep -E '^(== |pylazymem-entrypoint: )' "$logf" | sed -e 's/^== /    /' -e 's/^pylazymem-entrypoint: /    entrypoint: /'
    res=$(grep -E '^== RESULT ' "$logf" | tail -n 1 | sed 's/^== RESULT [^ ]* //')
    if [ "$rc" -ne 0 ] || [[ "$res" != PASS* ]]; then
        FAILED=1
        N_FAIL=$((N_FAIL + 1))
        [ -n "$res" ] || { res="FAIL (container exit $rc, no result line)"; tail -n 20 "$logf"; }
    else
        N_PASS=$((N_PASS + 1))
    fi
    row "case $id: $title" "$(since "$t0")" "$(echo "$res" | sed -E 's/ all expectations held//; s/ \([0-9]+s\)$//')"
}

want() { [[ ",$CASES," == *",$1,"* ]]; }

want 1 && run_case 1 "root + --device /dev/userfaultfd" full-root 1 \
    --device /dev/userfaultfd "${KVM[@]}"
want 2 && run_case 2 "user + --device /dev/userfaultfd (entrypoint)" full-user 1 \
    --device /dev/userfaultfd "${KVM[@]}" -e PYLAZYMEM_RUN_AS=tester
if want 3 || want 3b; then
    old=$(cat "$SYSCTL" 2>/dev/null || echo "")
    if [ -n "$old" ] && [ "$old" != 0 ]; then
        log "vm.unprivileged_userfaultfd is $old on this host: setting it to 0 for case 3, restored afterwards"
        $SUDO sh -c "echo 0 > $SYSCTL"
        CLEANUP+=("$SUDO sh -c 'echo $old > $SYSCTL'")
    fi
    if want 3; then
        prof=${DERIVED_PROFILE:-$REPO_PROFILE}
        run_case 3 "user + seccomp profile with userfaultfd" user-mode-only 1 \
            --security-opt "seccomp=$prof" -e PYLAZYMEM_RUN_AS=tester
    fi
    if want 3b; then
        run_case 3b "as 3 with docker/seccomp-userfaultfd.json" user-mode-only 0 \
            --security-opt "seccomp=$REPO_PROFILE" -e PYLAZYMEM_RUN_AS=tester
    fi
    if [ -n "$old" ] && [ "$old" != 0 ]; then $SUDO sh -c "echo $old > $SYSCTL"; fi
fi
want 4 && run_case 4 "root + default seccomp, no device" blocked 1

if [ "$STARTED_DAEMON" -eq 1 ] && [ "$STOP_DAEMON" -eq 1 ]; then
    stop_daemon
    STARTED_DAEMON=0
fi
summary
# One closing line in the form CI runners read: cases whose expectations held / did not.
echo "matrix: $N_PASS passed, $N_FAIL failed"
exit "$FAILED"
