"""Statistics over in-silico perturbation shifts: upstream Geneformer's ``InSilicoPerturberStats`` modes.

Input is one long table of shifts (:data:`SHIFT_COLUMNS`), one row per value::

    cell       str      cell identifier ("" when unknown: upstream's list-mode gene pickles lose it)
    perturbed  str      perturbed gene token id(s) in perturbation order, joined with "+" ("1234", "12+34")
    affected   int64    token id of the gene whose embedding was compared, or CELL_EMB (-1) for the cell
                        (upstream's ``"cell_emb"`` key)
    state      str      cell state the value refers to ("" without ``cell_states_to_model``)
    cos        float64  upstream's value: without states the cosine similarity of original vs perturbed
                        (1 = no change); with states cos(perturbed, state) - cos(original, state)

Row order matters only where upstream's output order depends on it (which affected gene appears first,
the order of ``aggregate_data`` values): readers keep the order upstream's files hold the values in.

:func:`compute_stats` returns the same table as ``InSilicoPerturberStats.get_stats`` writes (columns in
upstream's order, rows in upstream's order, the index upstream writes as the CSV's first column), for
``goal_state_shift``, ``vs_null``, ``aggregate_data``, ``aggregate_gene_shifts`` and ``mixture_model``
(``combos=0``, no ``anchor_gene``). Where upstream is wrong it is corrected (see ``docs/isp.md``):
``aggregate_data`` works for a group of several genes, ``goal_state_shift`` ignores gene-embedding
values instead of failing, the rank-sum reference is never subsampled, NaN values are left out of tests
and of the Benjamini-Hochberg correction, and the mixture model's impact component is the one with the
lower mean whatever label the fit gives it. Everything is a vectorised groupby: cost grows with the number
of values, not with genes x dictionary entries as upstream's ``aggregate_gene_shifts`` does.
"""

from __future__ import annotations

import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
from scipy.special import ndtr

LOGGER = logging.getLogger(__name__)

CELL_EMB = -1
SHIFT_COLUMNS = ("cell", "perturbed", "affected", "state", "cos")
MODES = ("goal_state_shift", "vs_null", "aggregate_data", "aggregate_gene_shifts", "mixture_model")
FDR_ALPHA = 0.05
STATE_KEYS = ("state_key", "start_state", "goal_state", "alt_states")

GenesPerturbed = Union[str, Sequence[str]]


class IspStatsError(ValueError):
    """The shifts or options cannot give the requested statistics (says what to change)."""


# ----------------------------------------------------------------------------- dictionaries


def _read_dictionary(directory: Path, stem: str) -> dict:
    for suffix, load in ((".json", lambda p: json.loads(p.read_text())), (".pkl", lambda p: pickle.loads(p.read_bytes()))):
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return load(path)
    raise IspStatsError(f"{directory} has no {stem}.json or {stem}.pkl: pass the folder with the model's Geneformer dictionaries")


@dataclass(frozen=True)
class GeneDictionaries:
    """Token id -> Ensembl id and Ensembl id -> gene symbol (upstream's inverted dictionaries).

    Inversion keeps the last entry for a value, as upstream's ``invert_dict`` does (several symbols map to
    one Ensembl id in ``gene_name_id_dict``)."""

    token_to_id: dict
    id_to_name: dict

    @classmethod
    def from_dir(cls, directory: str | Path) -> "GeneDictionaries":
        """Read ``token_dictionary`` and ``gene_name_id_dict`` (.json or upstream's .pkl) from ``directory``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise IspStatsError(f"dictionary folder not found: {directory}")
        tokens = _read_dictionary(directory, "token_dictionary")
        names = _read_dictionary(directory, "gene_name_id_dict")
        return cls({int(v): k for k, v in tokens.items()}, {v: k for k, v in names.items()})

    @property
    def id_to_token(self) -> dict:
        return {v: k for k, v in self.token_to_id.items()}

    def ensembl(self, token: int):
        return self.token_to_id.get(token, np.nan)

    def symbol(self, token: int):
        return self.id_to_name.get(self.token_to_id.get(token, np.nan), np.nan)


# ----------------------------------------------------------------------------- keys


def perturbed_key(tokens: Sequence[int] | int) -> str:
    """The ``perturbed`` column's key for token id(s): ``"1234"`` or ``"12+34"`` (order kept)."""
    if isinstance(tokens, (int, np.integer)):
        return str(int(tokens))
    return "+".join(str(int(t)) for t in tokens)


def key_tokens(key: str) -> tuple[int, ...]:
    return tuple(int(t) for t in key.split("+"))


def _display(tokens: tuple):
    """Upstream's value for a key: the single item itself, else a tuple (its CSV shows ``(12, 34)``)."""
    return tokens[0] if len(tokens) == 1 else tuple(tokens)


# ----------------------------------------------------------------------------- options


@dataclass
class StatsOptions:
    """What to compute. ``genes_perturbed``: ``"all"`` or the Ensembl ids perturbed together (a list run);
    ``cell_states``: upstream's ``cell_states_to_model`` (needed by ``goal_state_shift``)."""

    mode: str
    genes_perturbed: GenesPerturbed = "all"
    cell_states: Optional[dict] = None
    alt_states: list = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise IspStatsError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if isinstance(self.genes_perturbed, str):
            if self.genes_perturbed != "all":
                raise IspStatsError(f"genes_perturbed must be 'all' or a list of Ensembl ids, not {self.genes_perturbed!r}")
        else:
            self.genes_perturbed = [str(g) for g in self.genes_perturbed]
            if not self.genes_perturbed:
                raise IspStatsError("genes_perturbed is an empty list: give the Ensembl ids that were perturbed, or 'all'")
        if self.mode == "goal_state_shift" and self.cell_states is None:
            raise IspStatsError("goal_state_shift needs cell_states (upstream's cell_states_to_model: state_key, "
                                "start_state, goal_state, alt_states)")
        if self.mode in ("vs_null", "mixture_model", "aggregate_gene_shifts", "aggregate_data") and self.cell_states:
            raise IspStatsError(f"{self.mode} works on shifts without cell states (upstream fails on them): "
                                "drop cell_states, or use goal_state_shift")
        if self.mode == "mixture_model" and self.genes_perturbed != "all":
            raise IspStatsError("mixture_model fits one mean per perturbed gene: it needs a genes_perturbed='all' run")
        if self.mode == "aggregate_data" and self.genes_perturbed == "all":
            raise IspStatsError("aggregate_data is for one perturbation (a gene or group) in many cells: give "
                                "genes_perturbed as the list of Ensembl ids of that run")
        if self.cell_states is not None:
            self._check_states()

    def _check_states(self) -> None:
        states = dict(self.cell_states)
        unknown = set(states) - set(STATE_KEYS)
        missing = [k for k in ("state_key", "start_state", "goal_state") if states.get(k) is None]
        if unknown or missing:
            raise IspStatsError(f"cell_states needs the keys state_key, start_state, goal_state (and alt_states); "
                                f"missing {missing}, unknown {sorted(unknown)}")
        alt = states.get("alt_states") or []
        if not isinstance(alt, list):
            raise IspStatsError("cell_states['alt_states'] must be a list (even of one state)")
        alt = [a for a in alt if a is not None]
        every = [states["start_state"], states["goal_state"], *alt]
        if len(set(every)) != len(every):
            raise IspStatsError(f"cell states must be distinct: {every}")
        self.alt_states = [str(a) for a in alt]

    @property
    def goal_state(self) -> str:
        return str(self.cell_states["goal_state"])


# ----------------------------------------------------------------------------- statistics


def benjamini_hochberg(pvalues: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (FDR), float64, same order as ``pvalues``.

    q_(i) = min_{j >= i} p_(j) * n / j over the ascending p-values, capped at 1. NaN p-values stay NaN
    and do not count in n (statsmodels' ``fdr_bh`` turns every q-value NaN when one p-value is)."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    if valid.size == 0:
        return out
    order = valid[np.argsort(p[valid], kind="mergesort")]
    ranks = np.arange(1, order.size + 1, dtype=np.float64)
    adjusted = p[order] / (ranks / order.size)
    adjusted = np.minimum.accumulate(adjusted[::-1])[::-1]
    out[order] = np.minimum(adjusted, 1.0)
    return out


def _rank_sum_p(rank_sum_first: np.ndarray, n1: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """Two-sided Wilcoxon rank-sum p-value (normal approximation, no tie correction, as
    ``scipy.stats.ranksums``) from the first sample's rank sum in the pooled sample."""
    n1 = np.asarray(n1, dtype=np.float64)
    n2 = np.asarray(n2, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (rank_sum_first - n1 * (n1 + n2 + 1) / 2.0) / np.sqrt(n1 * n2 * (n1 + n2 + 1) / 12.0)
        p = 2.0 * ndtr(-np.abs(z))
    return np.where((n1 > 0) & (n2 > 0), p, np.nan)


def rank_sum_vs_reference(reference: np.ndarray, values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """p-value of ``ranksums(reference, values[groups == g])`` for every g in ``range(n_groups)``.

    One sort of the reference and one ``searchsorted`` for all values: the rank sum of a group in
    reference + group is m(m+1)/2 + sum over its values of (#reference < v + #reference == v / 2)."""
    ref = np.sort(reference)
    below = np.searchsorted(ref, values, side="left") + np.searchsorted(ref, values, side="right")
    m = np.bincount(groups, minlength=n_groups).astype(np.float64)
    group_sum = m * (m + 1) / 2.0 + np.bincount(groups, weights=below / 2.0, minlength=n_groups)
    n_ref = float(ref.size)
    ref_sum = (n_ref + m) * (n_ref + m + 1) / 2.0 - group_sum
    return _rank_sum_p(ref_sum, np.full(n_groups, n_ref), m)


def rank_sum_two_samples(values: np.ndarray, groups: np.ndarray, first: np.ndarray, n_groups: int) -> np.ndarray:
    """p-value of ``ranksums(values[first & g], values[~first & g])`` for every group g (pooled ranks
    within each group, ties averaged)."""
    ranks = pd.Series(values).groupby(groups).rank(method="average").to_numpy()
    n1 = np.bincount(groups, weights=first.astype(np.float64), minlength=n_groups)
    n2 = np.bincount(groups, minlength=n_groups) - n1
    r1 = np.bincount(groups, weights=np.where(first, ranks, 0.0), minlength=n_groups)
    return _rank_sum_p(r1, n1, n2)


# ----------------------------------------------------------------------------- the table of shifts


def check_shifts(shifts: pd.DataFrame, where: str = "shifts") -> pd.DataFrame:
    """Validate and normalise a table of shifts to :data:`SHIFT_COLUMNS` dtypes (a copy)."""
    missing = [c for c in SHIFT_COLUMNS if c not in shifts.columns]
    if missing:
        raise IspStatsError(f"{where} lacks the columns {missing}; the stats input has columns {list(SHIFT_COLUMNS)}")
    out = shifts.loc[:, list(SHIFT_COLUMNS)].reset_index(drop=True).copy()
    out["cell"] = out["cell"].fillna("").astype(str)
    out["state"] = out["state"].fillna("").astype(str)
    out["perturbed"] = out["perturbed"].astype(str)
    keys = pd.Series(pd.unique(out["perturbed"]), dtype=object)
    bad = ~keys.str.fullmatch(r"\d+(\+\d+)*")
    if bad.any():
        raise IspStatsError(f"{where}: perturbed must be token ids joined with '+', e.g. '1234' or '12+34', "
                            f"not {keys[bad].iloc[0]!r}")
    out["affected"] = pd.to_numeric(out["affected"], errors="raise").astype(np.int64)
    out["cos"] = pd.to_numeric(out["cos"], errors="raise").astype(np.float64)
    return out


def _sorted_keys(keys: pd.Series) -> list[str]:
    """Distinct keys in upstream's order (``sorted`` over its int / tuple keys)."""
    return sorted(pd.unique(keys), key=key_tokens)


def _gene_frame(keys: list[str], dictionaries: GeneDictionaries) -> pd.DataFrame:
    """Upstream's ``Gene`` / ``Gene_name`` / ``Ensembl_ID`` columns for the sorted perturbation keys."""
    tokens = [key_tokens(k) for k in keys]
    names = [_display(tuple(dictionaries.symbol(t) for t in ts)) for ts in tokens]
    ids = [_display(tuple(dictionaries.ensembl(t) for t in ts)) for ts in tokens]
    return pd.DataFrame({"Gene": [_display(ts) for ts in tokens], "Gene_name": names, "Ensembl_ID": ids},
                        index=pd.RangeIndex(len(keys)))


def _cell_rows(shifts: pd.DataFrame) -> pd.DataFrame:
    return shifts[shifts["affected"] == CELL_EMB]


class _Groups:
    """Values of one table grouped by perturbation key (in the sorted key order)."""

    def __init__(self, rows: pd.DataFrame, keys: list[str]) -> None:
        codes = pd.Categorical(rows["perturbed"], categories=keys).codes
        keep = codes >= 0
        self.codes = codes[keep].astype(np.int64)
        self.values = rows["cos"].to_numpy()[keep]
        self.n_groups = len(keys)

    def counts(self) -> np.ndarray:
        return np.bincount(self.codes, minlength=self.n_groups)

    def means(self) -> np.ndarray:
        """Mean per key (NaN values left out; NaN for a key without values)."""
        ok = ~np.isnan(self.values)
        n = np.bincount(self.codes[ok], minlength=self.n_groups)
        s = pd.Series(self.values[ok]).groupby(self.codes[ok]).sum().reindex(range(self.n_groups)).to_numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, s / np.maximum(n, 1), np.nan)

    def finite(self) -> "_Groups":
        ok = ~np.isnan(self.values)
        out = object.__new__(_Groups)
        out.codes, out.values, out.n_groups = self.codes[ok], self.values[ok], self.n_groups
        return out


def _sig_sort(frame: pd.DataFrame, fdr: str, shift: str) -> pd.DataFrame:
    frame["Sig"] = (frame[fdr] < FDR_ALPHA).astype(np.int64)
    return frame.sort_values(by=["Sig", shift, fdr], ascending=[False, False, True])


def goal_state_shift(shifts: pd.DataFrame, dictionaries: GeneDictionaries, options: StatsOptions) -> pd.DataFrame:
    """Mean shift towards the goal (and each alternative) state per perturbation; for a run over all
    genes also the rank-sum p-value against all perturbations' shifts ("random"), its FDR, N_Detections
    and Sig, sorted by Sig, shift (descending) and FDR (upstream's ``isp_stats_to_goal_state``)."""
    rows = _cell_rows(shifts)
    rows = rows[rows["state"] != ""]
    if rows.empty:
        raise IspStatsError("goal_state_shift needs per-state cell shifts (state column set); the input has none: "
                            "run the perturbation with cell_states_to_model")
    states = [options.goal_state, *options.alt_states]
    absent = [s for s in states if s not in set(rows["state"])]
    if absent:
        raise IspStatsError(f"no shifts for the state(s) {absent}; the input has states {sorted(set(rows['state']))}")
    keys = _sorted_keys(rows["perturbed"])
    by_state = {s: _Groups(rows[rows["state"] == s], keys) for s in states}
    if options.genes_perturbed != "all":  # one grouped perturbation: no random perturbations to compare with
        first = {s: g.finite() for s, g in by_state.items()}
        out = pd.DataFrame({"Shift_to_goal_end": [first[options.goal_state].means()[0]]})
        for alt in options.alt_states:
            out[f"Shift_to_alt_end_{alt}"] = [first[alt].means()[0]]
        return out
    frame = _gene_frame(keys, dictionaries)
    columns = {}
    for state in states:
        groups = by_state[state].finite()
        pvalue = rank_sum_vs_reference(groups.values, groups.values, groups.codes, groups.n_groups)
        columns[state] = (groups.means(), pvalue)
    frame["Shift_to_goal_end"] = columns[options.goal_state][0]
    for alt in options.alt_states:
        frame[f"Shift_to_alt_end_{alt}"] = columns[alt][0]
    frame["Goal_end_vs_random_pval"] = columns[options.goal_state][1]
    for alt in options.alt_states:
        frame[f"Alt_end_vs_random_pval_{alt}"] = columns[alt][1]
    frame["Goal_end_FDR"] = benjamini_hochberg(frame["Goal_end_vs_random_pval"])
    for alt in options.alt_states:
        frame[f"Alt_end_FDR_{alt}"] = benjamini_hochberg(frame[f"Alt_end_vs_random_pval_{alt}"])
    frame["N_Detections"] = by_state[options.goal_state].counts()
    return _sig_sort(frame, "Goal_end_FDR", "Shift_to_goal_end")


def _stateless_cell_rows(shifts: pd.DataFrame, what: str) -> pd.DataFrame:
    rows = _cell_rows(shifts)
    if (rows["state"] != "").any():
        raise IspStatsError(f"{what} has per-state shifts (a cell_states_to_model run); this mode compares "
                            "stateless cell shifts: use goal_state_shift")
    if rows.empty:
        raise IspStatsError(f"{what} has no cell-embedding shifts (affected == {CELL_EMB})")
    return rows


def vs_null(shifts: pd.DataFrame, null_shifts: pd.DataFrame, dictionaries: GeneDictionaries,
            options: StatsOptions) -> pd.DataFrame:
    """Per perturbation: mean shift in the test and the null cells, their difference, the rank-sum
    p-value of test vs null (NaN -> 1), its FDR, detections, Sig; sorted by Sig, difference, FDR."""
    test = _stateless_cell_rows(shifts, "the test input")
    null = _stateless_cell_rows(null_shifts, "the null input")
    keys = _sorted_keys(test["perturbed"])
    frame = _gene_frame(keys, dictionaries)
    t, n = _Groups(test, keys), _Groups(null, keys)
    frame["Test_avg_shift"] = t.means()
    frame["Null_avg_shift"] = n.means()
    frame["Test_vs_null_avg_shift"] = frame["Test_avg_shift"] - frame["Null_avg_shift"]
    tf, nf = t.finite(), n.finite()
    pvalue = rank_sum_two_samples(
        np.concatenate([tf.values, nf.values]), np.concatenate([tf.codes, nf.codes]),
        np.concatenate([np.ones(tf.values.size, bool), np.zeros(nf.values.size, bool)]), len(keys))
    frame["Test_vs_null_pval"] = np.where(np.isnan(pvalue), 1.0, pvalue)
    frame["Test_vs_null_FDR"] = benjamini_hochberg(frame["Test_vs_null_pval"])
    frame["N_Detections_test"] = t.counts().astype(np.uint32)
    frame["N_Detections_null"] = n.counts().astype(np.uint32)
    return _sig_sort(frame, "Test_vs_null_FDR", "Test_vs_null_avg_shift")


def aggregate_data(shifts: pd.DataFrame, dictionaries: GeneDictionaries, options: StatsOptions) -> pd.DataFrame:
    """Every cell shift of the grouped perturbation of ``genes_perturbed`` (any order of the group):
    columns ``Cosine_sim`` and ``Gene`` (the symbol(s)), index restarting at 0 per perturbation key."""
    rows = _stateless_cell_rows(shifts, "the input")
    keys = _sorted_keys(rows["perturbed"])
    wanted = set(options.genes_perturbed)
    chosen = [k for k in keys if {dictionaries.ensembl(t) for t in key_tokens(k)} == wanted]
    if not chosen:
        raise IspStatsError(f"no shifts of the perturbation {sorted(wanted)} in the input (perturbed: "
                            f"{[tuple(dictionaries.ensembl(t) for t in key_tokens(k)) for k in keys[:5]]} ...)")
    parts = []
    for key in chosen:
        values = rows.loc[rows["perturbed"] == key, "cos"].to_numpy()
        symbol = _display(tuple(dictionaries.symbol(t) for t in key_tokens(key)))
        parts.append(pd.DataFrame({"Cosine_sim": values, "Gene": [symbol] * len(values)}))
    return pd.concat(parts)


def _per_token(tokens: np.ndarray, lookup) -> np.ndarray:
    """``lookup(token)`` for every token (NaN for CELL_EMB), one call per distinct token."""
    unique, inverse = np.unique(tokens, return_inverse=True)
    return np.array([np.nan if t == CELL_EMB else lookup(int(t)) for t in unique], dtype=object)[inverse]


def aggregate_gene_shifts(shifts: pd.DataFrame, dictionaries: GeneDictionaries, options: StatsOptions) -> pd.DataFrame:
    """Mean, population stdev and count of the shifts of every (perturbed, affected) pair, the cell
    embedding ("cell_emb") rows first, each block by ascending mean (upstream's ``isp_aggregate_gene_shifts``).
    The index is the pair's position in upstream's pass (perturbations sorted, pairs by first appearance)."""
    if (shifts["state"] != "").any():
        raise IspStatsError("aggregate_gene_shifts works on stateless shifts; the input has per-state values")
    if shifts.empty:
        raise IspStatsError("no shifts in the input")
    keys = _sorted_keys(shifts["perturbed"])
    genes = _gene_frame(keys, dictionaries)
    order = pd.Categorical(shifts["perturbed"], categories=keys).codes
    table = pd.DataFrame({"key": order, "affected": shifts["affected"].to_numpy(), "cos": shifts["cos"].to_numpy(),
                          "row": np.arange(len(shifts))})
    grouped = table.groupby(["key", "affected"], sort=False)
    pairs = grouped.agg(first=("row", "min"), mean=("cos", "mean"), n=("cos", "size"))
    pairs["stdev"] = grouped["cos"].std(ddof=0)
    pairs = pairs.reset_index().sort_values(["key", "first"], kind="stable").reset_index(drop=True)
    key_codes = pairs["key"].to_numpy()
    affected = pairs["affected"].to_numpy()
    is_cell = affected == CELL_EMB
    out = pd.DataFrame({
        "Perturbed": genes["Gene"].to_numpy()[key_codes],
        "Gene_name": genes["Gene_name"].to_numpy()[key_codes],
        "Ensembl_ID": genes["Ensembl_ID"].to_numpy()[key_codes],
        "Affected": np.where(is_cell, "cell_emb", affected.astype(object)),
        "Affected_gene_name": _per_token(affected, dictionaries.symbol),
        "Affected_Ensembl_ID": _per_token(affected, dictionaries.ensembl),
        "Cosine_sim_mean": pairs["mean"].to_numpy(),
        "Cosine_sim_stdev": pairs["stdev"].to_numpy(),
        "N_Detections": pairs["n"].to_numpy(),
    })
    out["_cell"] = is_cell
    return out.sort_values(by=["_cell", "Cosine_sim_mean"], ascending=[False, True]).drop(columns="_cell")


def mixture_model(shifts: pd.DataFrame, dictionaries: GeneDictionaries, options: StatsOptions) -> pd.DataFrame:
    """Two-component Gaussian mixture (scikit-learn, ``random_state=0``) fitted to the mean cell shift
    of every perturbation; ``Impact_component`` (1 = in the component of lower mean, i.e. the larger
    change) for the mean and ``Impact_component_percent`` over the cells; sorted by component, mean."""
    from sklearn.mixture import GaussianMixture

    rows = _stateless_cell_rows(shifts, "the input")
    keys = _sorted_keys(rows["perturbed"])
    frame = _gene_frame(keys, dictionaries)
    groups = _Groups(rows, keys)
    means = groups.means()
    if np.isnan(means).any() or len(keys) < 2:
        raise IspStatsError(f"mixture_model needs >= 2 perturbations with finite shifts ({len(keys)} in the input)")
    model = GaussianMixture(n_components=2, random_state=0).fit(means.reshape(-1, 1))
    centres = model.means_[:, 0]
    impact = int(np.argmin(centres))

    def in_impact(values: np.ndarray) -> np.ndarray:
        low, high = centres.min(), centres.max()
        predicted = model.predict(values.reshape(-1, 1)) == impact if values.size else np.zeros(0, bool)
        return np.where(values < low, True, np.where(values > high, False, predicted)).astype(np.int64)

    frame["Test_avg_shift"] = means
    frame["Impact_component"] = in_impact(means)
    finite = groups.finite()
    per_value = in_impact(finite.values)
    with np.errstate(invalid="ignore", divide="ignore"):
        frame["Impact_component_percent"] = (np.bincount(finite.codes, weights=per_value, minlength=len(keys))
                                             / finite.counts() * 100)
    frame["N_Detections"] = groups.counts()
    return frame.sort_values(by=["Impact_component", "Test_avg_shift"], ascending=[False, True])


def compute_stats(shifts: pd.DataFrame, dictionaries: GeneDictionaries, options: StatsOptions,
                  null_shifts: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Upstream's ``InSilicoPerturberStats`` table for ``options.mode`` (see the module docstring)."""
    shifts = check_shifts(shifts)
    LOGGER.info("%s over %d shifts of %d perturbations", options.mode, len(shifts), shifts["perturbed"].nunique())
    if options.mode == "vs_null":
        if null_shifts is None:
            raise IspStatsError("vs_null needs the null distribution's shifts (a run on other cells): pass null_shifts")
        return vs_null(shifts, check_shifts(null_shifts, "null shifts"), dictionaries, options)
    if options.mode == "goal_state_shift":
        return goal_state_shift(shifts, dictionaries, options)
    if options.mode == "aggregate_data":
        return aggregate_data(shifts, dictionaries, options)
    if options.mode == "aggregate_gene_shifts":
        return aggregate_gene_shifts(shifts, dictionaries, options)
    return mixture_model(shifts, dictionaries, options)
