"""What a process's shared-pool mappings cost, read from /proc/PID/smaps (needs no core).

A shared restore maps its pool (a memfd named "pylazymem-pool") privately: pages read are the
pool's (counted in Shared_* once another process maps them too, and split in Pss), pages written
are the process's own copies (Anonymous). `pylazymem inspect --pid PID` prints this.
"""
POOL_NAME = "/memfd:pylazymem-pool"
FIELDS = ("Rss", "Pss", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty",
          "Anonymous", "ShmemPmdMapped")   # the last: mapped as huge pages (a complete pool)


def pool_mappings(pid):
    """Totals in bytes over the pool mappings of process `pid`, and their count."""
    totals = dict.fromkeys(FIELDS, 0)
    mappings = 0
    inside = False
    try:
        f = open("/proc/%d/smaps" % pid)
    except FileNotFoundError:
        raise ProcessLookupError(3, "no process %d" % pid) from None
    except PermissionError:
        raise PermissionError(13, "cannot read the mappings of process %d (another user's: "
                              "needs root or the same uid)" % pid) from None
    with f:
        for line in f:
            head = line.split(None, 1)[0]
            if not head.endswith(":"):   # a mapping's first line: "start-end perms ... path"
                inside = POOL_NAME in line
                mappings += inside
                continue
            key = head[:-1]
            if inside and key in totals:
                totals[key] += int(line.split()[1]) * 1024
    totals["mappings"] = mappings
    return totals
