"""`vmae-ray probe fit|apply`: labels from a few examples, on committed embeddings.

`fit` joins a small labelled set (a few videos per class) with the embeddings of a committed
output, fits a multinomial logistic regression on the standardised embeddings (a linear probe;
scikit-learn), reports its cross-validated accuracy, and writes the head (`vmae_ray.heads`).
`apply` labels every video (or clip) of a committed output with a head and commits the labels
as tables of their own. Neither decodes a video: a nightly job embeds once, and labels come and
go as heads are fitted.

Honest numbers from very few examples:
- Nested cross-validation: the accuracy is measured on folds the regularisation was not chosen
  on. Outer folds are stratified by class; their number is the smallest class's count (at most
  5), so every class is in every training fold. Inside each training fold the inverse
  regularisation strength C is chosen from `C_GRID` by a second stratified cross-validation on
  the log loss (smoother than accuracy on tiny folds); with too few examples for that (a class
  with one example in the training fold) C is `DEFAULT_C`.
- Clip level: the folds are grouped by video (`StratifiedGroupKFold`), so clips of one video are
  never both in training and in test; class counts are counted in videos.
- The chance level stated beside the accuracy is that of always answering the most frequent
  class.
The head written is fitted on all examples, with C chosen the same way on all of them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from vmae_ray import schema
from vmae_ray.config import CommandParser, ConfigError, check_output_option, storage_errors_of
from vmae_ray.heads import LEVELS, HeadError, LinearHead, head_exists
from vmae_ray.labels import top_k_labels
from vmae_ray.listing import read_table_file, uri_spellings
from vmae_ray.reading import CommittedOutput, open_tables
from vmae_ray.storage import StorageOptions
from vmae_ray.writing import write_committed

# The folders `probe apply` writes: labels/, and video_labels/ for a clip-level head.
LABEL_TABLES = (schema.LABELS, schema.VIDEO_LABELS)

# Inverse regularisation strengths tried (scikit-learn's C; smaller = stronger). Frozen
# embeddings with a handful of examples per class need strong regularisation as often as not.
C_GRID = tuple(float(c) for c in 10.0 ** np.arange(-4, 3))
DEFAULT_C = 1.0
MAX_FOLDS = 5
SEED = 0  # fold shuffling: the same labels give the same folds and the same numbers
MAX_ITER = 5000
MAX_LISTED = 20  # label rows listed in an error message

KEY_COLUMNS = ("video_id", "uri")


# ------------------------------------------------------------------------------------------
# Labels and the join with the tables


@dataclass
class Examples:
    """Labelled rows of the tables: embeddings (N, D) float32, labels (N,), videos (N,)."""

    embeddings: np.ndarray
    labels: np.ndarray  # str
    video_ids: np.ndarray  # str: the group of each row (clips of one video share it)
    level: str

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels.tolist()))

    def videos_per_class(self) -> dict[str, int]:
        return {c: len(set(self.video_ids[self.labels == c].tolist())) for c in self.classes}

    def rows_per_class(self) -> dict[str, int]:
        return {c: int((self.labels == c).sum()) for c in self.classes}


def read_labels(uri: str, storage: StorageOptions, label_column: str) -> tuple[str, dict[str, str]]:
    """(key column, {key: label}) from a CSV, Parquet or JSON Lines file with ``video_id`` or
    ``uri`` and ``label_column``. Raises ConfigError naming --labels or --label-column for a
    missing column, empty values, or one video given two labels."""
    with storage_errors_of("--labels", uri, storage):  # credentials, endpoint
        try:
            table = read_table_file(uri, storage, what="labels file")
        except ValueError as exc:
            raise ConfigError("--labels", str(exc)) from exc
    columns = table.column_names
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    if key is None:
        raise ConfigError("--labels", f"{uri} has neither a 'video_id' nor a 'uri' column (columns: {', '.join(columns)})")
    if label_column not in columns:
        raise ConfigError("--label-column", f"{uri} has no column {label_column!r} (columns: {', '.join(columns)})")
    keys = [None if v is None else str(v) for v in table.column(key).to_pylist()]
    labels = [None if v is None else str(v).strip() for v in table.column(label_column).to_pylist()]
    empty = [i for i, (k, v) in enumerate(zip(keys, labels)) if not k or not v]
    if empty:
        raise ConfigError("--labels", f"{uri}: rows {_listing(empty)} have an empty {key} or {label_column}")
    mapping: dict[str, str] = {}
    conflicts = []
    for k, v in zip(keys, labels):
        if mapping.setdefault(k, v) != v:
            conflicts.append(k)
    if conflicts:
        raise ConfigError("--labels", f"{uri}: these videos are given two different labels: {_listing(sorted(set(conflicts)))}")
    if not mapping:
        raise ConfigError("--labels", f"{uri} has no rows")
    return key, mapping


def join_labels(tables: CommittedOutput, key: str, labels: dict[str, str], level: str) -> Examples:
    """The rows of ``tables`` (videos/ for level video, clips/ for clip: every clip of a labelled
    video gets its label) whose ``key`` has a label. Raises ConfigError listing the label rows
    whose video is not in the tables (and saying which of them failed in errors/)."""
    table = schema.VIDEOS if level == "video" else schema.CLIPS
    columns = ["video_id", "uri"] + (["clip_index"] if level == "clip" else [])
    try:
        embeddings, rest = tables.embeddings(table, columns)
    except (ValueError, KeyError) as exc:
        raise ConfigError("--tables", str(exc)) from exc
    row_keys = np.array(rest.column(key).to_pylist(), dtype=object)
    if key == "uri":  # a relative local path in the labels file names the absolute one in the tables
        present, spelled = set(row_keys.tolist()), {}
        for k, v in labels.items():
            uri = next((s for s in uri_spellings(k) if s in present), k)
            if spelled.get(uri, (k, v))[1] != v:
                raise ConfigError("--labels", f"{spelled[uri][0]!r} and {k!r} name the same video ({uri}) with two "
                                  f"different labels ({spelled[uri][1]!r}, {v!r})")
            spelled[uri] = (k, v)
        labels = {uri: v for uri, (_, v) in spelled.items()}
    missing = sorted(set(labels) - set(row_keys.tolist()))
    if missing:
        failed = _failed_videos(tables, key, missing)
        detail = (f"; of these, {len(failed)} failed in the job (errors/: "
                  + ", ".join(f"{k} {t}" for k, t in list(failed.items())[:MAX_LISTED]) + ")") if failed else ""
        raise ConfigError("--labels", f"{len(missing)} labelled videos are not in {tables.uri}/{table} "
                          f"(matched on {key}): {_listing(missing)}{detail}")
    mask = np.array([k in labels for k in row_keys], dtype=bool)
    video_ids = np.array(rest.column("video_id").to_pylist(), dtype=str)[mask]
    clip_index = np.array(rest.column("clip_index").to_pylist())[mask] if level == "clip" else np.zeros(len(video_ids))
    # Rows in (uri, video_id, clip_index) order: the folds, and so the fit, depend on the
    # examples, not on file order, nor on where the corpus sits (video_ids hash the whole URI,
    # so the same folder moved elsewhere would get other folds in video_id order).
    uris = np.array(rest.column("uri").to_pylist(), dtype=str)[mask]
    order = np.lexsort([clip_index, video_ids, uris])
    return Examples(
        embeddings=np.ascontiguousarray(embeddings[mask][order]),
        labels=np.array([labels[k] for k in row_keys[mask]], dtype=str)[order],
        video_ids=video_ids[order],
        level=level,
    )


def _failed_videos(tables: CommittedOutput, key: str, keys: list[str]) -> dict[str, str]:
    try:
        errors = tables.read(schema.ERRORS, [key, "error_type"])
    except KeyError:
        return {}
    wanted = set(keys)
    return {k: t for k, t in zip(errors.column(key).to_pylist(), errors.column("error_type").to_pylist()) if k in wanted}


def check_classes(examples: Examples) -> None:
    """Raise ConfigError for a single class or a class with fewer than 2 labelled videos."""
    per_class = examples.videos_per_class()
    if len(per_class) < 2:
        raise ConfigError("--labels", f"only one class ({', '.join(per_class)}); a classifier needs at least two")
    few = {c: n for c, n in per_class.items() if n < 2}
    if few:
        raise ConfigError("--labels", "every class needs at least 2 labelled videos (to fit on one and test on "
                          "another); too few: " + ", ".join(f"{c} ({n})" for c, n in sorted(few.items())))


# ------------------------------------------------------------------------------------------
# Fitting (scikit-learn)


def group_numbers(video_ids: np.ndarray) -> np.ndarray:
    """Each row's video as a number, 0, 1, ... in the order the videos first appear in the rows.

    scikit-learn's grouped folds number the groups in sorted order of their labels; video_ids
    hash the whole URI, so the same corpus in another folder would sort (and fold) otherwise.
    Numbered in row order (`join_labels` orders rows by URI), the folds depend only on the
    examples."""
    _, first, inverse = np.unique(video_ids, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def cv_splits(y: np.ndarray, groups: np.ndarray, grouped: bool, max_folds: int = MAX_FOLDS) -> list | None:
    """Stratified (and, with ``grouped``, video-grouped) folds in which every class is on both
    sides, as many as the smallest class allows (<= max_folds); None when not even 2 exist."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    classes = set(y.tolist())
    per_class = min(len(set(groups[y == c].tolist())) for c in classes)
    for k in range(min(max_folds, per_class), 1, -1):
        splitter = (StratifiedGroupKFold(k, shuffle=True, random_state=SEED) if grouped
                    else StratifiedKFold(k, shuffle=True, random_state=SEED))
        splits = list(splitter.split(np.zeros(len(y)), y, groups if grouped else None))
        if all(set(y[train].tolist()) == classes and set(y[test].tolist()) == classes for train, test in splits):
            return splits
    return None


def _pipeline(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    # lbfgs fits the multinomial (softmax) model for 3+ classes in every scikit-learn this
    # project supports; 2 classes are the equivalent binomial model.
    return Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(C=c, max_iter=MAX_ITER))])


def _fit_choosing_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, grouped: bool) -> tuple[Any, float, int]:
    """(fitted pipeline, C, inner folds used or 0) with C chosen by cross-validated log loss."""
    from sklearn.model_selection import GridSearchCV

    splits = cv_splits(y, groups, grouped)
    if splits is None:
        return _pipeline(DEFAULT_C).fit(x, y), DEFAULT_C, 0
    search = GridSearchCV(_pipeline(DEFAULT_C), {"logreg__C": list(C_GRID)}, cv=splits, scoring="neg_log_loss",
                          refit=True)
    search.fit(x, y)
    return search.best_estimator_, float(search.best_params_["logreg__C"]), len(splits)


def head_weights(pipeline) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(W (L, D), b (L,), class names) of a fitted StandardScaler + LogisticRegression pipeline,
    with the scaler folded in: softmax(W x + b) equals the pipeline's predict_proba(x).

    (x - mean) / scale then coef: W = coef / scale, b = intercept - W @ mean. Two classes:
    scikit-learn keeps one row w (the logit of the second class); [-w/2, w/2] has the same
    softmax, so every head is read the same way.
    """
    scaler, logreg = pipeline[0], pipeline[-1]  # by position: any step names
    coef = np.asarray(logreg.coef_, dtype=np.float64)
    intercept = np.asarray(logreg.intercept_, dtype=np.float64)
    if coef.shape[0] == 1 and len(logreg.classes_) == 2:
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
    mean = np.asarray(scaler.mean_, dtype=np.float64)
    scale = np.asarray(scaler.scale_, dtype=np.float64)
    weight = coef / scale
    return weight, intercept - weight @ mean, [str(c) for c in logreg.classes_]


@dataclass
class Fit:
    head: LinearHead
    metrics: dict[str, Any]


def fit_head(examples: Examples, *, model_fingerprint: str, embedding_fingerprint: str, settings_fingerprint: str,
             info: dict[str, Any] | None = None) -> Fit:
    """Cross-validate (nested), then fit on all examples; returns the head and its metrics.

    Raises ConfigError (see `check_classes`) for a single class or a class with < 2 videos.
    """
    from threadpoolctl import threadpool_limits

    check_classes(examples)
    # One BLAS/OpenMP thread: these fits are small (examples x D), and worker threads waking for
    # each tiny product cost more than the work (measured on 2 busy cores: 70 ms per fit of 16
    # examples x 64 dims with the default threads, 1.5 ms with one).
    with threadpool_limits(limits=1):
        return _fit_head(examples, model_fingerprint=model_fingerprint, embedding_fingerprint=embedding_fingerprint,
                         settings_fingerprint=settings_fingerprint, info=info)


def _fit_head(examples: Examples, *, model_fingerprint: str, embedding_fingerprint: str, settings_fingerprint: str,
              info: dict[str, Any] | None) -> Fit:
    import sklearn
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    # float64: scikit-learn fits float32 input in float32; the head is float64 (see vmae_ray.heads).
    x, y, groups = examples.embeddings.astype(np.float64), examples.labels, group_numbers(examples.video_ids)
    grouped = examples.level == "clip"
    classes = examples.classes
    outer = cv_splits(y, groups, grouped)
    if outer is None:  # check_classes makes this unreachable for stratified folds
        raise ConfigError("--labels", "too few labelled videos per class to cross-validate")
    predicted = np.empty(len(y), dtype=object)
    logits = np.zeros((len(y), len(classes)))
    chosen = []
    for train, test in outer:
        model, c, _ = _fit_choosing_c(x[train], y[train], groups[train], grouped)
        weight, bias, names = head_weights(model)
        assert names == classes
        logits[test] = x[test] @ weight.T + bias
        predicted[test] = model.predict(x[test])
        chosen.append(c)
    predicted = predicted.astype(str)

    final, c, inner_folds = _fit_choosing_c(x, y, groups, grouped)
    weight, bias, names = head_weights(final)
    head = LinearHead(weight=weight, bias=bias, id2label=dict(enumerate(names)), level=examples.level,
                      model_fingerprint=model_fingerprint, embedding_fingerprint=embedding_fingerprint,
                      settings_fingerprint=settings_fingerprint, info=dict(info or {}))

    precision, recall, f1, support = precision_recall_fscore_support(y, predicted, labels=classes, zero_division=0)
    counts = examples.rows_per_class()
    metrics: dict[str, Any] = {
        "level": examples.level,
        "cv_accuracy": float(accuracy_score(y, predicted)),
        "cv_balanced_accuracy": float(balanced_accuracy_score(y, predicted)),
        # Always answering the most frequent class; 1/classes when classes are balanced.
        "chance_level": max(counts.values()) / len(y),
        "num_classes": len(classes),
        "n_per_class": examples.videos_per_class(),
        "n_videos": len(set(groups.tolist())),
        "n_examples": len(y),
        "per_class": {cl: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for cl, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion_matrix": {"labels": classes, "rows": "true label", "columns": "predicted label",
                             "matrix": confusion_matrix(y, predicted, labels=classes).tolist()},
        "cv": {"outer_folds": len(outer), "inner_folds": inner_folds, "grouped_by_video": grouped,
               "stratified": True, "shuffle_seed": SEED, "c_chosen_by": "neg_log_loss",
               "c_per_outer_fold": chosen},
        "C": c,
        "C_grid": list(C_GRID),
        "embedding_dim": head.embedding_dim,
        "sklearn": sklearn.__version__,
    }
    if grouped:
        metrics["n_clips_per_class"] = counts
        # Videos from the mean of their clips' held-out logits, as `apply` and the job label videos.
        vids, inverse = np.unique(groups, return_inverse=True)
        mean_logits = np.zeros((len(vids), len(classes)))
        np.add.at(mean_logits, inverse, logits)
        truth = np.empty(len(vids), dtype=object)
        truth[inverse] = y
        metrics["cv_video_accuracy"] = float(np.mean(np.array(classes)[mean_logits.argmax(axis=1)] == truth))
    return Fit(head, metrics)


def format_report(metrics: dict[str, Any]) -> str:
    """The fit's metrics as text: accuracy and chance, per-class precision/recall, confusion matrix."""
    classes = metrics["confusion_matrix"]["labels"]
    width = max(12, *(len(c) + 2 for c in classes))
    unit = "clips" if metrics["level"] == "clip" else "videos"
    cv = metrics["cv"]
    lines = [
        f"cross-validated accuracy: {metrics['cv_accuracy']:.3f} over {metrics['n_examples']} {unit} "
        f"(chance {metrics['chance_level']:.3f}: always the most frequent class; balanced accuracy "
        f"{metrics['cv_balanced_accuracy']:.3f})",
        f"  {cv['outer_folds']}-fold stratified cross-validation"
        + (" grouped by video" if cv["grouped_by_video"] else "")
        + f", C chosen inside each training fold from {metrics['C_grid'][0]:g}..{metrics['C_grid'][-1]:g}",
    ]
    if "cv_video_accuracy" in metrics:
        lines.append(f"  videos (mean of their clips' logits): accuracy {metrics['cv_video_accuracy']:.3f} "
                     f"over {metrics['n_videos']} videos")
    lines.append("")
    lines.append(f"{'label':<{width}}{'precision':>10}{'recall':>8}{'videos':>8}" + (f"{'clips':>7}" if unit == "clips" else ""))
    for c in classes:
        pc = metrics["per_class"][c]
        line = f"{c:<{width}}{pc['precision']:>10.3f}{pc['recall']:>8.3f}{metrics['n_per_class'][c]:>8}"
        if unit == "clips":
            line += f"{metrics['n_clips_per_class'][c]:>7}"
        lines.append(line)
    lines += ["", "confusion matrix (rows: true label, columns: predicted):"]
    cell = max(6, *(len(c) + 1 for c in classes))
    lines.append(" " * width + "".join(f"{c:>{cell}}" for c in classes))
    for c, row in zip(classes, metrics["confusion_matrix"]["matrix"]):
        lines.append(f"{c:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# Applying


def apply_head(tables: CommittedOutput, head: LinearHead, top_k: int) -> dict[str, pa.Table]:
    """Label tables with ``head``: {labels: per video (video head) or per clip (clip head)} and,
    for a clip head, {video_labels: per video, from the mean of its clip logits}. Rows sorted by
    video_id (and clip_index). Scores are softmax probabilities, top_k per row."""
    if head.level == "video":
        embeddings, rest = tables.embeddings(schema.VIDEOS, ["video_id", "uri"])
        order = np.argsort(np.array(rest.column("video_id").to_pylist(), dtype=str), kind="stable")
        rest = rest.take(order)
        labels, scores = top_k_labels(head.logits(embeddings[order]), head.id2label, top_k)
        return {schema.LABELS: _labels_table(rest, labels, scores, clip_level=False)}
    embeddings, rest = tables.embeddings(schema.CLIPS, ["video_id", "uri", "clip_index"])
    video_ids = np.array(rest.column("video_id").to_pylist(), dtype=str)
    order = np.lexsort([np.array(rest.column("clip_index").to_pylist()), video_ids])
    rest, video_ids = rest.take(order), video_ids[order]
    logits = head.logits(embeddings[order])
    labels, scores = top_k_labels(logits, head.id2label, top_k)
    clip_table = _labels_table(rest, labels, scores, clip_level=True)
    vids, first, inverse = np.unique(video_ids, return_index=True, return_inverse=True)
    sums = np.zeros((len(vids), logits.shape[1]))
    np.add.at(sums, inverse, logits)
    mean_logits = sums / np.bincount(inverse)[:, None]
    video_labels, video_scores = top_k_labels(mean_logits, head.id2label, top_k)
    video_table = _labels_table(rest.take(first).select(["video_id", "uri"]), video_labels, video_scores,
                                clip_level=False)
    return {schema.LABELS: clip_table, schema.VIDEO_LABELS: video_table}


def _labels_table(rest: pa.Table, labels: list[list[str]], scores: list[list[float]], *, clip_level: bool) -> pa.Table:
    out_schema = schema.labels_schema(clip_level=clip_level)
    columns = {name: rest.column(name) for name in ("video_id", "uri", "clip_index")[: 3 if clip_level else 2]}
    columns["top_labels"] = pa.array(labels, out_schema.field("top_labels").type)
    columns["top_scores"] = pa.array(scores, out_schema.field("top_scores").type)
    return pa.table({f.name: columns[f.name].cast(f.type) for f in out_schema}, schema=out_schema)


# ------------------------------------------------------------------------------------------
# The command


def build_parser(prog: str = "vmae-ray probe") -> argparse.ArgumentParser:
    parser = CommandParser(prog=prog, description="Linear heads on committed embeddings: labels from a few "
                                     "examples, without decoding any video again.")
    sub = parser.add_subparsers(dest="action", required=True, metavar="{fit,apply}")
    fit = sub.add_parser("fit", help="fit a head on a few labelled videos per class and report its accuracy",
                         description="Fit a multinomial logistic-regression head on the embeddings of labelled videos "
                         "(standardised, regularisation chosen by cross-validation), print its cross-validated "
                         "accuracy, and write HEAD_DIR.")
    fit.add_argument("--tables", required=True, help="a committed vmae-ray embed output (its _SUCCESS); any fsspec URI")
    fit.add_argument("--labels", required=True, help="CSV, Parquet or JSON Lines with a video_id or uri column and "
                     "a label column: a few videos per class (5 to 50 is typical; at least 2)")
    fit.add_argument("--head", required=True, help="directory to write the head to; any fsspec URI")
    fit.add_argument("--label-column", default="label", help="the labels file's label column (default: label)")
    fit.add_argument("--level", choices=LEVELS, default="video",
                     help="fit on video embeddings (videos/, default) or on clip embeddings (clips/: every clip of "
                     "a labelled video gets its label)")
    fit.add_argument("--overwrite", action="store_true", help="replace a head already in --head")
    apply = sub.add_parser("apply", help="label every video (or clip) of committed tables with a head",
                           description="Label the committed embeddings of --tables with a head; writes "
                           "OUTPUT/labels/*.parquet (and video_labels/ for a clip-level head) and OUTPUT/_SUCCESS.")
    apply.add_argument("--tables", required=True, help="a committed vmae-ray embed output; any fsspec URI")
    apply.add_argument("--head", required=True, help="a head directory written by `vmae-ray probe fit`")
    apply.add_argument("--output", required=True, help="directory for the labels (its own folder); any fsspec URI")
    apply.add_argument("--top-k", type=int, default=5, help="labels per row (default 5)")
    for p in (fit, apply):
        p.add_argument("--storage-options", help="fsspec options as a JSON object, or @FILE with one; default: "
                       "$VMAE_RAY_STORAGE_OPTIONS")
        p.set_defaults(parser=p)  # bad input found later is reported by the subcommand's own parser
    return parser


def run_probe(argv: Sequence[str], prog: str = "vmae-ray probe") -> int:
    """The probe command; exit status 0, or 2 (a message naming the option) for bad input."""
    parser = build_parser(prog)
    args = parser.parse_args(list(argv))
    try:
        if args.action == "fit":
            fit_command(args)
        else:
            apply_command(args)
    except ConfigError as exc:
        args.parser.error(str(exc))
    return 0


def _open_tables(args: argparse.Namespace, uris: list[str]) -> tuple[CommittedOutput, StorageOptions]:
    """`reading.open_tables`, and the fingerprints a head is tied to must be on record."""
    tables, storage = open_tables(args, uris)
    uri = args.tables
    missing = [name for name, value in (("model.fingerprint", tables.model.get("fingerprint")),
                                        ("embedding_fingerprint", tables.manifest.get("embedding_fingerprint")))
               if not value]
    if missing:
        raise ConfigError("--tables", f"{uri}/_SUCCESS has no {' or '.join(missing)} (written by an older "
                          "vmae-ray); rerun the same `vmae-ray embed` command on it: nothing is embedded again and "
                          "_SUCCESS records them")
    return tables, storage


def fit_command(args: argparse.Namespace) -> Fit:
    started = time.perf_counter()
    tables, storage = _open_tables(args, [args.labels, args.head])
    if head_exists(args.head, storage) and not args.overwrite:
        raise ConfigError("--head", f"{args.head} already holds a head; pass --overwrite to replace it")
    key, labels = read_labels(args.labels, storage, args.label_column)
    examples = join_labels(tables, key, labels, args.level)
    unit = "clips of " if args.level == "clip" else ""
    print(f"probe fit: {len(labels)} labelled videos ({unit and f'{len(examples.labels)} clips; '}"
          f"{len(set(labels.values()))} classes) joined on {key} with {tables.uri} "
          f"(run {tables.run_id}, {args.level} embeddings, D={examples.embeddings.shape[1]})", flush=True)
    result = fit_head(examples, model_fingerprint=tables.model["fingerprint"],
                      embedding_fingerprint=tables.manifest["embedding_fingerprint"],
                      settings_fingerprint=tables.settings_fingerprint or "",
                      info={"fitted_on": {"tables": tables.uri, "run_id": tables.run_id,
                                          "model": tables.model.get("ref"), "labels": args.labels,
                                          "label_column": args.label_column},
                            "embedding_settings": tables.manifest.get("embedding_settings"),
                            "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    result.head.save(args.head, storage, metrics=result.metrics)
    print(format_report(result.metrics))
    print(f"\nhead: {args.head} ({result.head.num_labels} labels, {args.level} level, C={result.metrics['C']:g}, "
          f"fitted on all {len(examples.labels)} examples; {time.perf_counter() - started:.1f}s)\n"
          f"  label tables:   vmae-ray probe apply --tables {args.tables} --head {args.head} --output LABELS_OUT\n"
          f"  label in a run: vmae-ray embed ... --head {args.head}", flush=True)
    return result


def apply_command(args: argparse.Namespace) -> dict[str, Any]:
    if args.top_k < 1:
        raise ConfigError("--top-k", f"expected a positive number; got {args.top_k}")
    tables, storage = _open_tables(args, [args.head, args.output])
    check_output_option(args.output, storage, LABEL_TABLES)  # before any work: the whole table is read below
    with storage_errors_of("--head", args.head, storage):  # credentials, endpoint
        try:
            head = LinearHead.load(args.head, storage)
        except HeadError as exc:
            raise ConfigError("--head", str(exc)) from exc
    try:
        head.check_embeddings(model_fingerprint=tables.model.get("fingerprint"),
                              embedding_fingerprint=tables.manifest.get("embedding_fingerprint"),
                              embedding_dim=tables.model.get("embedding_dim"), what=f"the tables {tables.uri}",
                              embedding_settings=tables.manifest.get("embedding_settings"))
    except HeadError as exc:
        raise ConfigError("--head", str(exc)) from exc
    try:
        out = apply_head(tables, head, args.top_k)
    except (ValueError, KeyError) as exc:
        raise ConfigError("--tables", str(exc)) from exc
    manifest = {
        "command": "probe apply", "top_k": args.top_k,
        "head": {"uri": args.head, **head.describe()},
        "tables": {"uri": tables.uri, "run_id": tables.run_id, "settings_fingerprint": tables.settings_fingerprint,
                   "embedding_fingerprint": tables.manifest.get("embedding_fingerprint")},
        "counts": {name: t.num_rows for name, t in out.items()},
    }
    try:
        success = write_committed(args.output, storage, out, manifest, owns=LABEL_TABLES)
    except ValueError as exc:
        raise ConfigError("--output", str(exc)) from exc
    counts = ", ".join(f"{name}/ {t.num_rows} rows" for name, t in out.items())
    print(f"probe apply: {head.num_labels}-label {head.level}-level head {args.head} on {tables.uri} -> "
          f"{args.output}: {counts}, _SUCCESS (run {success['run_id']})", flush=True)
    return success


def _listing(items: list) -> str:
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f", ... ({len(items)} in all)" if len(items) > MAX_LISTED else "")


if __name__ == "__main__":
    sys.exit(run_probe(sys.argv[1:]))
