"""The zero class is served by the kernel's shared zero page: reading ZERO-deferred (or EMPTY)
pages does not grow anonymous RSS; writing them does. Measured in a fresh subprocess."""

import json

import pytest

import pylazymem as plm
from _helpers import pages

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]

MiB = 1 << 20
SLACK = 4 * MiB


@pytest.mark.parametrize("region_kw", ["{}", "{'max_cluster_pages': 1}"])
def test_reading_zero_pages_does_not_grow_rss(run_py_ok, region_kw):
    out = run_py_ok(f"""
        r = plm.Region(64 << 20, **{region_kw})
        v = pages(r)
        r.defer_fill(0, 48 << 20, plm.ZERO)          # 48 MiB ZERO-deferred, 16 MiB EMPTY
        ramp = np.arange(r.npages) * PS               # one read per page, byte by byte below
        before = rss_anon()
        nz = int(np.count_nonzero(v))                 # reads every byte of every page
        firsts = int(r.ndarray(np.uint8)[ramp].sum())
        after_read = rss_anon()
        st = r.stats()
        meta = r.meta
        present = int((meta["state"] == int(plm.PageState.PRESENT)).sum())
        zero_cls = int((meta["cls"] == int(plm.PageClass.ZERO)).sum())
        v[:, 0] = 1                                   # now store into every page
        ones = int(v[:, 0].sum())
        after_write = rss_anon()
        print(json.dumps(dict(nz=nz, firsts=firsts, before=before, after_read=after_read,
                              after_write=after_write, present=present, zero_cls=zero_cls,
                              npages=r.npages, ones=ones, by_class=st["faults_by_class"])))
        r.close()
    """, timeout=90)
    m = json.loads(out.strip().splitlines()[-1])
    assert m["nz"] == 0 and m["firsts"] == 0
    grew = m["after_read"] - m["before"]
    assert grew < SLACK, f"reading 64 MiB of zero pages grew RssAnon by {grew / MiB:.1f} MiB"
    assert m["present"] == m["npages"] and m["zero_cls"] == m["npages"], m
    assert m["by_class"]["zero"] > 0 and m["by_class"]["empty"] > 0, m
    assert m["by_class"]["canonical"] == 0, m
    assert m["ones"] == m["npages"]
    wrote = m["after_write"] - m["after_read"]
    assert wrote > 60 * MiB, f"writing 64 MiB grew RssAnon by only {wrote / MiB:.1f} MiB"


def test_write_fault_on_zero_page_makes_data(make_region):
    r = make_region(1 << 20, max_cluster_pages=1)
    r.defer_fill(0, r.nbytes, plm.ZERO)
    v = pages(r)
    v[5, 10] = 3                     # first touch of page 5 is a store
    assert int(v[5].sum()) == 3 and v[5, 10] == 3
    assert not v[6].any()            # first touch of page 6 is a load
    meta = r.meta
    assert meta["state"][5] == meta["state"][6] == int(plm.PageState.PRESENT)
    assert meta["cls"][5] == int(plm.PageClass.DATA)
    assert meta["flags"][5] & int(plm.PageFlag.WRITE_FAULT)
    assert meta["signature"][5] == 0
    assert meta["cls"][6] == int(plm.PageClass.ZERO)
    assert not meta["flags"][6] & int(plm.PageFlag.WRITE_FAULT)
    assert 0 < meta["order"][5] < meta["order"][6]
    st = r.stats()
    assert st["faults_write"] == 1 and st["faults_by_class"]["zero"] == 2, st
