# pylazymem container image: the wheel is built from this source tree, then installed into a
# slim test image together with tests/ and examples/.
#
# Nothing is downloaded during the build (docker/run-matrix.sh builds it with --network none):
#   - the base images are local: pylazymem-base:<release> (python3, python3-venv, libxxhash0,
#     libzstd1, liblz4-1, libcurl4) and pylazymem-base:<release>-build (the same plus gcc,
#     libc6-dev, libxxhash-dev, libzstd-dev, liblz4-dev, libcurl4-openssl-dev,
#     python3-dev), made by docker/run-matrix.sh with debootstrap + docker import;
#   - every Python package comes from docker/wheelhouse/, which the script fills on the host
#     with `pip download` for the base image's Python version and platform.
# Build by hand (after docker/run-matrix.sh made the base images and the wheelhouse once):
#   docker build --network none -t pylazymem-test .
ARG BASE=pylazymem-base:bookworm
ARG BUILD_BASE=pylazymem-base:bookworm-build

# ---- build stage: compile the C core (cffi + libxxhash, libzstd, liblz4, libcurl) into a wheel for this Python -------------
FROM ${BUILD_BASE} AS build
ENV PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheelhouse \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY docker/wheelhouse/ /wheelhouse/
RUN python3 -m venv /opt/pip
COPY pyproject.toml setup.py README.md /src/
COPY csrc/ /src/csrc/
COPY pylazymem/ /src/pylazymem/
# /dist gets the pylazymem wheel and the wheels it needs at run time and for the tests (copied
# from the wheelhouse); the build backend (setuptools, wheel, cffi) is installed from the
# wheelhouse into pip's isolated build environment.
RUN /opt/pip/bin/pip wheel --wheel-dir /dist '/src[test]' \
 && ls -l /dist

# ---- test stage: the wheel and the test dependencies, offline; tests/ and examples/ ---------------
FROM ${BASE} AS test
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_NO_INDEX=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8
COPY --from=build /dist/ /dist/
# `tester` is the unprivileged user of the matrix; it belongs to the groups the entrypoint
# gives /dev/userfaultfd and /dev/kvm to when they are passed in (--device).
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --find-links /dist 'pylazymem[test]' \
 && rm -rf /dist \
 && groupadd --system uffd \
 && (getent group kvm >/dev/null || groupadd --system kvm) \
 && useradd --create-home --uid 1000 --user-group --groups uffd,kvm --shell /bin/bash tester \
 && install -d -o tester -g tester /app \
 && python3 -c 'import pylazymem; print("pylazymem", pylazymem.__version__, "installed")'
COPY --chown=tester:tester pyproject.toml /app/
COPY --chown=tester:tester tests/ /app/tests/
COPY --chown=tester:tester examples/ /app/examples/
COPY docker/entrypoint.sh /usr/local/bin/pylazymem-entrypoint
COPY docker/matrix_checks.py docker/matrix_plugin.py /usr/local/lib/pylazymem-docker/
WORKDIR /app
# PYLAZYMEM_RUN_AS=tester runs the command as that user (see docker/entrypoint.sh).
ENTRYPOINT ["/usr/local/bin/pylazymem-entrypoint"]
CMD ["pylazymem", "features"]
