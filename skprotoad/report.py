"""Reports to look at: figures and one self-contained HTML page.

:func:`evaluation_report` shows how a fitted detector did on labelled test
images (ROC and PRO curves, score histograms with the threshold, a table per
defect type, the worst false alarms and misses); :func:`prediction_report`
shows what it said about unlabelled ones (the most anomalous images, the
score histogram). Both write PNG files and an ``index.html`` that embeds them,
so the page can be mailed or archived alone.

The plots need matplotlib (``pip install "skprotoad[report]"``); the image
grids use only Pillow.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ._checks import check_int
from ._files import refuse_existing, write_new_file
from .metrics import evaluate_maps, image_auroc, pro_curve
from .plotting import grid

__all__ = ["evaluation_report", "prediction_report", "EVALUATION_FILES", "PREDICTION_FILES"]

# Every file each report may write into its folder (which of them it writes
# depends on its inputs): what a caller checks before any work.
EVALUATION_FILES = ("index.html", "scores.png", "roc.png", "pro.png", "false_alarms.png",
                    "misses.png")
PREDICTION_FILES = ("index.html", "scores.png", "contact_sheet.png")

_NORMAL_COLOR, _DEFECT_COLOR, _THRESHOLD_COLOR = "#1f77b4", "#d62728", "#222222"


def _figure(width=5.0, height=3.6):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reports need matplotlib: pip install 'skprotoad[report]' (or matplotlib)."
        ) from None
    # a Figure without pyplot: no global state, no GUI backend
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig, fig.add_subplot()


def _png_bytes(fig_or_array):
    buffer = io.BytesIO()
    if isinstance(fig_or_array, np.ndarray):
        from PIL import Image

        Image.fromarray(fig_or_array).save(buffer, format="PNG")
    else:
        fig_or_array.savefig(buffer, format="png")
    return buffer.getvalue()


def _write_all(out_dir, pngs, page, overwrite, own_files):
    """Write ``<name>.png`` for each of ``pngs`` and ``index.html``; checked
    first, so that a refusal leaves no report half replaced. With
    ``overwrite``, then remove those of ``own_files`` (the names this kind of
    report may write) that this one did not write."""
    files = {name: (f"{name}.png", data) for name, data in pngs.items()}
    # file names undecodable in the locale's encoding (surrogates) as their bytes
    files["index"] = ("index.html", page.encode("utf-8", "surrogateescape"))
    for file_name, _ in files.values():
        refuse_existing(Path(out_dir) / file_name, overwrite)
    paths = {}
    for name, (file_name, data) in files.items():
        paths[name] = write_new_file(Path(out_dir) / file_name,
                                     lambda tmp, data=data: Path(tmp).write_bytes(data),
                                     overwrite=overwrite)
    if overwrite:
        # an earlier report's false_alarms.png, say, would contradict this page;
        # removed after the writes, so that a failed write leaves the old report whole
        written = {file_name for file_name, _ in files.values()}
        for file_name in set(own_files) - written:
            stale = Path(out_dir) / file_name
            if stale.is_symlink() or stale.is_file():  # a folder of that name is not ours
                stale.unlink(missing_ok=True)
    return paths


def _score_histogram(scores, threshold, labels=None):
    fig, ax = _figure()
    scores = np.asarray(scores, dtype=float)
    bins = np.histogram_bin_edges(np.r_[scores, threshold], bins=min(40, max(10, len(scores) // 3)))
    if labels is None:
        ax.hist(scores, bins=bins, color=_NORMAL_COLOR, alpha=0.8, label="images")
    else:
        ax.hist(scores[labels == 0], bins=bins, color=_NORMAL_COLOR, alpha=0.6,
                label=f"normal ({int((labels == 0).sum())})")
        ax.hist(scores[labels == 1], bins=bins, color=_DEFECT_COLOR, alpha=0.6,
                label=f"defective ({int((labels == 1).sum())})")
    ax.axvline(threshold, color=_THRESHOLD_COLOR, linestyle="--",
               label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    return fig


def _roc_figure(labels, scores, threshold, masks=None, maps=None):
    from sklearn.metrics import roc_curve

    fig, ax = _figure(4.2, 4.0)
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, color=_DEFECT_COLOR,
            label=f"images (AUROC {image_auroc(labels, scores):.3f})")
    flagged = scores > threshold
    ax.plot(flagged[labels == 0].mean(), flagged[labels == 1].mean(), "o",
            color=_THRESHOLD_COLOR, label="at the threshold")
    if masks is not None:
        truth = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
        values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
        if truth.any() and not truth.all():
            pfpr, ptpr, _ = roc_curve(truth, values, drop_intermediate=True)
            ax.plot(pfpr, ptpr, color=_NORMAL_COLOR, label="pixels")
    ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC")
    ax.legend(frameon=False, loc="lower right")
    return fig


def _pro_figure(masks, maps, fpr_limit, aupro_value):
    fig, ax = _figure(4.2, 4.0)
    fpr, pro, _ = pro_curve(masks, maps)
    keep = fpr <= fpr_limit
    ax.plot(fpr[keep], pro[keep], color=_DEFECT_COLOR,
            label=f"AUPRO@{fpr_limit:g} {aupro_value:.3f}")
    ax.set_xlim(0, fpr_limit)
    ax.set_ylim(0, 1)
    ax.set_xlabel("pixel false positive rate")
    ax.set_ylabel("per-region overlap")
    ax.set_title("PRO")
    ax.legend(frameon=False, loc="lower right")
    return fig


def _examples(indices, scores, names, draw_example, n_cols=4):
    images = [draw_example(i) for i in indices]
    titles = [f"{names[i]}  {scores[i]:.4g}" for i in indices]
    return grid(images, titles=titles, ncols=min(n_cols, len(images)), tile_size=256)


def _table(header, rows):
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _page(title, sections):
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:4px 8px;text-align:right}th{background:#f3f3f3}img{max-width:100%}"
             ".figs img{max-width:49%}")
    body = []
    for heading, content in sections:
        body.append(f"<h2>{html.escape(heading)}</h2>{content}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            + "".join(body) + "</body></html>")


def _img(data, alt):
    encoded = base64.b64encode(data).decode("ascii")
    return f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{encoded}'>"


def _per_image(values, name, n):
    """``values``, one per image of ``n``, as a list of str; None stays None."""
    if values is None:
        return None
    if isinstance(values, (str, bytes)):
        # a str is a sequence too: of characters, one "name" each
        raise TypeError(f"{name} must be a sequence of one str per image, got {values!r}.")
    try:
        values = [str(v) for v in values]
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of one str per image, got {type(values).__name__}."
        ) from None
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} images.")
    return values


def _check_scores(scores, threshold, n=None, name="scores"):
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1 or len(scores) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {scores.shape}.")
    if n is not None and len(scores) != n:
        raise ValueError(f"{name} has {len(scores)} values for {n} images.")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name} must be finite.")
    threshold = float(threshold)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}.")
    return scores, threshold


def evaluation_report(out_dir, y_true, scores, threshold, *, defect_types=None, names=None,
                      masks=None, maps=None, draw_example=None, n_examples=8,
                      fpr_limit=0.3, title="skprotoad evaluation", overwrite=False):
    """Write the figures and the HTML page of an evaluation on labelled images.

    Parameters
    ----------
    out_dir : path
        Folder for ``index.html``, ``scores.png``, ``roc.png``, ``pro.png``
        (with masks), ``false_alarms.png`` and ``misses.png`` (with
        ``draw_example``); created if missing.
    y_true : array-like of shape (n_images,)
        1 for defective images, 0 for normal ones; both must occur.
    scores : array-like of shape (n_images,)
        Anomaly scores, higher = more anomalous (``-score_samples``).
    threshold : float
        The score above which an image is flagged (``-offset_``).
    defect_types : sequence of str, default=None
        Each image's type (normal ones any name in ``y_true == 0``): adds the
        table per type (image AUROC against the normal images, detection rate).
    names : sequence of str, default=None
        Shown under the example images; defaults to the image indices.
    masks, maps : sequences of 2-D arrays, default=None
        Ground truth masks and anomaly maps in one geometry: adds the pixel
        ROC, the PRO curve and the pixel metrics.
    draw_example : callable, default=None
        ``draw_example(i)`` returns image ``i`` as an RGB uint8 array (an
        overlay of its map, say): adds the grids of the worst false alarms
        (the highest-scoring normal images above the threshold) and the worst
        misses (the lowest-scoring defective images below it).
    n_examples : int, default=8
        Images per grid, at most; at least 1 (for no grids, leave
        ``draw_example`` None).
    fpr_limit : float, default=0.3
        FPR limit of the AUPRO.
    title : str, default="skprotoad evaluation"
    overwrite : bool, default=False
        Replace existing report files, and remove those of
        :data:`EVALUATION_FILES` that this report does not write (an earlier
        report's ``false_alarms.png`` when there is no false alarm now, say),
        so that the folder holds one report; no other file is touched. Without
        it an existing file raises ``FileExistsError`` and nothing of it is lost.

    Returns
    -------
    paths : dict
        ``{"index": ..., "scores": ..., ...}``: the files written.

    Examples
    --------
    >>> import tempfile, numpy as np
    >>> from skprotoad.report import evaluation_report
    >>> y = np.array([0, 0, 0, 1, 1]); s = np.array([0.1, 0.2, 0.35, 0.3, 0.9])
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     sorted(evaluation_report(tmp, y, s, threshold=0.25))
    ['index', 'roc', 'scores']
    """
    labels = np.asarray(y_true)
    if labels.ndim != 1 or not set(np.unique(labels)) <= {0, 1}:
        raise ValueError("y_true must be a 1-D sequence of 0 (normal) and 1 (defective).")
    if labels.min() == labels.max():
        raise ValueError("y_true must hold normal (0) and defective (1) images.")
    scores, threshold = _check_scores(scores, threshold, len(labels))
    if (masks is None) != (maps is None):
        raise ValueError("give masks and maps together, or neither.")
    defect_types = _per_image(defect_types, "defect_types", len(labels))
    names = _per_image(names, "names", len(labels)) or [str(i) for i in range(len(labels))]
    n_examples = check_int(n_examples, "n_examples", 1)
    flagged = scores > threshold
    metrics = evaluate_maps(labels, scores, masks, maps, fpr_limit=fpr_limit)
    figures = {"scores": _score_histogram(scores, threshold, labels),
               "roc": _roc_figure(labels, scores, threshold, masks, maps)}
    if masks is not None:
        figures["pro"] = _pro_figure(masks, maps, fpr_limit, metrics["aupro"])
    pngs = {name: _png_bytes(fig) for name, fig in figures.items()}

    summary = [("images", f"{len(labels)} ({int(labels.sum())} defective)"),
               ("threshold", f"{threshold:.6g}"),
               ("false alarms on normal images", f"{flagged[labels == 0].mean():.1%} "
                f"({int(flagged[labels == 0].sum())} of {int((labels == 0).sum())})"),
               ("defective images detected", f"{flagged[labels == 1].mean():.1%} "
                f"({int(flagged[labels == 1].sum())} of {int(labels.sum())})")]
    summary += [(k.replace("_", " "), f"{v:.4f}") for k, v in metrics.items()
                if v is not None and np.isfinite(v)]
    sections = [("Summary", _table(("measure", "value"), summary))]
    if defect_types is not None:
        types = np.asarray(defect_types)
        rows = []
        for t in sorted(set(types[labels == 1])):
            keep = (types == t) | (labels == 0)
            rows.append((t, int((types == t).sum()),
                         f"{image_auroc(labels[keep], scores[keep]):.3f}",
                         f"{flagged[types == t].mean():.1%}"))
        sections.append(("Per defect type", _table(
            ("type", "images", "image AUROC vs normal", "detected at the threshold"), rows)))
    sections.append(("Curves", "<div class='figs'>" + "".join(
        _img(pngs[k], k) for k in ("scores", "roc", "pro") if k in pngs) + "</div>"))
    if draw_example is not None:
        normal = np.flatnonzero((labels == 0) & flagged)
        worst_alarms = normal[np.argsort(-scores[normal], kind="stable")][:n_examples]
        defective = np.flatnonzero((labels == 1) & ~flagged)
        worst_misses = defective[np.argsort(scores[defective], kind="stable")][:n_examples]
        for key, heading, chosen, none in (
            ("false_alarms", "Worst false alarms", worst_alarms,
             "No normal image is above the threshold."),
            ("misses", "Worst misses", worst_misses,
             "No defective image is below the threshold."),
        ):
            if len(chosen):
                pngs[key] = _png_bytes(_examples(chosen, scores, names, draw_example))
                sections.append((heading, _img(pngs[key], heading)))
            else:
                sections.append((heading, f"<p>{none}</p>"))
    return _write_all(out_dir, pngs, _page(title, sections), overwrite, EVALUATION_FILES)


def prediction_report(out_dir, scores, threshold, *, names=None, draw_example=None,
                      n_examples=16, title="skprotoad predictions", overwrite=False):
    """Write the contact sheet, the score histogram and the HTML page of a
    prediction on unlabelled images.

    Parameters
    ----------
    out_dir : path
        Folder for ``index.html``, ``scores.png`` and ``contact_sheet.png``
        (with ``draw_example``); created if missing.
    scores : array-like of shape (n_images,)
        Anomaly scores, higher = more anomalous.
    threshold : float
        The score above which an image is flagged.
    names : sequence of str, default=None
    draw_example : callable, default=None
        ``draw_example(i)`` returns image ``i`` as an RGB uint8 array: the
        contact sheet shows the ``n_examples`` most anomalous images.
    n_examples : int, default=16
        Images on the contact sheet, at most; at least 1 (for no sheet, leave
        ``draw_example`` None).
    title : str, default="skprotoad predictions"
    overwrite : bool, default=False
        As in :func:`evaluation_report`, with :data:`PREDICTION_FILES`.

    Returns
    -------
    paths : dict
    """
    scores, threshold = _check_scores(scores, threshold)
    names = _per_image(names, "names", len(scores)) or [str(i) for i in range(len(scores))]
    n_examples = check_int(n_examples, "n_examples", 1)
    flagged = scores > threshold
    pngs = {"scores": _png_bytes(_score_histogram(scores, threshold))}
    sections = [("Summary", _table(("measure", "value"), [
        ("images", len(scores)), ("threshold", f"{threshold:.6g}"),
        ("flagged as anomalous", f"{flagged.mean():.1%} ({int(flagged.sum())})")])),
        ("Scores", _img(pngs["scores"], "score histogram"))]
    if draw_example is not None:
        chosen = np.argsort(-scores, kind="stable")[:n_examples]
        pngs["contact_sheet"] = _png_bytes(_examples(chosen, scores, names, draw_example))
        sections.append(("Most anomalous images", _img(pngs["contact_sheet"], "contact sheet")))
    return _write_all(out_dir, pngs, _page(title, sections), overwrite, PREDICTION_FILES)
