#!/bin/sh
# Entrypoint of the pylazymem test image.
#
# Without PYLAZYMEM_RUN_AS it just runs the command. With PYLAZYMEM_RUN_AS=USER (and started as
# root, the default), it first gives USER access to the devices passed in with --device, then
# drops to USER and runs the command:
#   /dev/userfaultfd  group uffd, mode 0660 (full-mode userfaultfd for USER)
#   /dev/kvm          group kvm,  mode 0660
# The nodes are the container's own (Docker creates them with mknod in the container's /dev),
# so the host's device permissions are not touched. USER gets no capabilities and the
# no_new_privs bit: it is as unprivileged as `docker run --user` would make it.
set -eu

user="${PYLAZYMEM_RUN_AS:-}"
if [ $# -eq 0 ]; then
    set -- pylazymem features
fi
if [ -z "$user" ]; then
    exec "$@"
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "pylazymem-entrypoint: PYLAZYMEM_RUN_AS=$user needs the container to start as root" >&2
    exit 2
fi
if ! home=$(getent passwd "$user" | cut -d: -f6) || [ -z "$home" ]; then
    echo "pylazymem-entrypoint: no such user: $user" >&2
    exit 2
fi
for spec in /dev/userfaultfd:uffd /dev/kvm:kvm; do
    dev=${spec%%:*}
    group=${spec#*:}
    if [ -c "$dev" ]; then
        if chgrp "$group" "$dev" && chmod 0660 "$dev"; then
            echo "pylazymem-entrypoint: $dev: group $group, mode 0660 for $user" >&2
        else
            echo "pylazymem-entrypoint: could not give $user access to $dev" >&2
        fi
    fi
done
export HOME="$home" USER="$user" LOGNAME="$user"
exec setpriv --reuid="$user" --regid="$user" --init-groups --inh-caps=-all --no-new-privs -- "$@"
