"""Pictures of a snapshot: the page map (class of every page, the working set and its
first-touch order). Needs matplotlib (pip install 'pylazymem[plot]')."""
import numpy as np

from ._meta import SNAP_STORED, SNAP_UNTOUCHED, SNAP_ZERO
from ._snapfile import TABLE_PARENT

CLASS_COLORS = {  # name: (table class or None, RGB), in the order of their kind numbers
    "untouched": (SNAP_UNTOUCHED, (0.92, 0.92, 0.92)),
    "zero": (SNAP_ZERO, (0.70, 0.82, 0.95)),
    "unique": (None, (0.20, 0.55, 0.25)),
    "duplicate": (None, (0.95, 0.60, 0.10)),
    "parent": (TABLE_PARENT, (0.60, 0.45, 0.75)),   # an incremental snapshot's parent has it
}


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'pylazymem[plot]'") from None
    return plt


def _grid(values, width):
    """Lay a per-page vector out row by row, padding the last row with NaN."""
    rows = -(-len(values) // width)
    out = np.full(rows * width, np.nan)
    out[:len(values)] = values
    return out.reshape(rows, width)


def page_map(table, working_set, path, title=""):
    """Write a PNG: left, each page coloured by class; right, the working set coloured by
    first-touch order (dark = early). One pixel per page, rows of up to 512 pages."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap

    npages = len(table)
    width = int(min(512, max(16, np.ceil(np.sqrt(npages)))))
    cls = table["cls"].astype(np.int64)
    store = table["store"]
    kind = np.zeros(npages)          # 0 untouched, 1 zero, 2 unique, 3 duplicate, 4 parent
    kind[cls == SNAP_ZERO] = 1
    kind[cls == TABLE_PARENT] = 4
    stored = cls == SNAP_STORED
    shared = np.zeros(npages, bool)
    if stored.any():
        # pages per store entry by np.unique, not bincount: its memory is the pages', not
        # the largest entry number's
        _, inverse, counts = np.unique(store[stored], return_inverse=True, return_counts=True)
        shared[stored] = counts[inverse] > 1
    kind[stored] = 2
    kind[stored & shared] = 3
    order = np.full(npages, np.nan)
    ws = np.asarray(working_set, dtype=np.int64)
    order[ws] = np.arange(len(ws))

    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), constrained_layout=True)
    cmap = ListedColormap([c for _, c in CLASS_COLORS.values()])
    axes[0].imshow(_grid(kind, width), cmap=cmap, vmin=-0.5, vmax=len(CLASS_COLORS) - 0.5,
                   interpolation="nearest", aspect="auto")
    axes[0].set_title("pages by class")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, c in CLASS_COLORS.values()]
    labels = ["%s (%d)" % (n, int((kind == i).sum())) for i, n in enumerate(CLASS_COLORS)]
    axes[0].legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2,
                   fontsize=8, frameon=False)
    bg = np.where(np.isnan(_grid(order, width)), 1.0, np.nan)
    axes[1].imshow(bg, cmap="Greys", vmin=0, vmax=8, interpolation="nearest", aspect="auto")
    im = axes[1].imshow(_grid(order, width), cmap="viridis", interpolation="nearest",
                        aspect="auto")
    axes[1].set_title("working set: %d pages, by first-touch order" % len(ws))
    if len(ws):
        fig.colorbar(im, ax=axes[1], shrink=0.6, label="first-touch order")
    for ax in axes:
        ax.set_xlabel("page %% %d" % width)
        ax.set_ylabel("page // %d" % width)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


PATH_COLORS = {"demand": "#d62728", "readahead": "#ff7f0e", "prefetch": "#1f77b4",
               "background": "#9e9e9e", "materialize": "#2ca02c"}


def timelines(panels, path, title=""):
    """Write a PNG of fault timelines: for each (name, timeline dict from Region.timeline())
    panel, every page that was made present, at the time it was, coloured by how."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5), squeeze=False,
                             constrained_layout=True)
    for ax, (name, tl) in zip(axes[0], panels):
        t_ms = np.asarray(tl["t_us"]) / 1000.0
        paths = np.asarray(tl["path"])
        for p, color in PATH_COLORS.items():
            sel = paths == p
            if sel.any():
                ax.scatter(t_ms[sel], np.asarray(tl["page"])[sel], s=1, c=color, lw=0,
                           label="%s (%d)" % (p, int(sel.sum())), rasterized=True)
        ax.set_title(name)
        ax.set_xlabel("ms after the region was created")
        ax.set_ylabel("page")
        ax.legend(loc="upper right", fontsize=8, markerscale=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)
