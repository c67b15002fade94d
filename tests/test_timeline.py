"""The fault timeline: when and how each page was first made present (off by default)."""
import numpy as np
import pytest

import pylazymem as plm
from _helpers import PAGE_SIZE

pytestmark = [pytest.mark.core, pytest.mark.uffd, pytest.mark.timeout(120)]
PS = PAGE_SIZE


def test_off_by_default_says_how_to_turn_it_on():
    with plm.Region(4 * PS) as r:
        with pytest.raises(plm.UffdError) as ei:
            r.timeline()
        assert "timeline=True" in str(ei.value)


def test_paths_and_times(tmp_path):
    with plm.Region(64 * PS, timeline=True, max_cluster_pages=4) as r:
        a = r.ndarray(np.uint8).reshape(64, PS)
        a[10].sum()                        # demand: a new stream, one page
        a[11].sum()                        # sequential: two pages, 12 by readahead
        r.materialize(40 * PS, 8 * PS)     # materialize
        path = str(tmp_path / "s.plm")
        a[0:8] = 7                         # demand writes (+ readahead neighbours)
        del a
        plm.checkpoint(r, path)
        tl = r.timeline()
    by_page = dict(zip(tl["page"].tolist(), tl["path"].tolist()))
    assert by_page[10] == by_page[11] == "demand"
    assert by_page[12] == "readahead"
    assert all(by_page[p] == "materialize" for p in range(40, 48))
    assert np.all(np.diff(tl["t_us"]) >= 0), "sorted by time"
    assert tl["t_us"][0] >= 0
    with plm.restore(path, prefetch="working-set", background=True, timeline=True) as r2:
        for _ in range(200):
            if not r2.stats()["background_running"]:
                break
            import time
            time.sleep(0.01)
        tl2 = r2.timeline()
        ws = set(plm.inspect(path).working_set.tolist())
        paths = dict(zip(tl2["page"].tolist(), tl2["path"].tolist()))
    stored_ws = [p for p in ws if p in paths]
    assert stored_ws and all(paths[p] == "prefetch" for p in stored_ws)
    assert any(v == "background" for v in paths.values()) or set(paths) <= ws
