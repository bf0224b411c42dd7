"""Two answers to the same input, side by side: what differs, marked (for compare mode).

Each function takes the two results as the tasks return them and gives plain data that a UI
shows as it likes (no gradio here):

    tokens(a, b)      two token lists -> per side [(token, "same" | "changed")], first diff
    ranks(a, b)       two ranked lists of (name, score) -> rows with each item's rank and
                      score in A and B, and how its rank moved
    retrieval(a, b)   two ranked id lists -> overlap@k, ids gained and lost, rank moves
"""

import difflib
from dataclasses import dataclass, field


@dataclass
class TokenDiff:
    a: list                      # [(token, "same" | "changed")] for side A
    b: list                      # the same for side B
    first_difference: int | None  # index of the first token where A and B part (None: equal)
    same_share: float            # matching tokens / tokens of the longer side

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "first_difference": self.first_difference,
                "same_share": self.same_share}


def tokens(a: list, b: list) -> TokenDiff:
    """Mark the tokens that differ between two outputs (an alignment, as `diff` does, so one
    inserted token does not mark everything after it)."""
    a, b = [str(t) for t in a], [str(t) for t in b]
    marks_a, marks_b = ["changed"] * len(a), ["changed"] * len(b)
    matcher = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    same = 0
    for block in matcher.get_matching_blocks():
        for i in range(block.size):
            marks_a[block.a + i] = marks_b[block.b + i] = "same"
        same += block.size
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    return TokenDiff(list(zip(a, marks_a)), list(zip(b, marks_b)), first,
                     same / max(len(a), len(b), 1))


def _pairs(ranked) -> list:
    out = []
    for item in ranked:
        if isinstance(item, dict):                       # fill-mask rows
            out.append((str(item.get("token_str", item.get("label", ""))),
                        float(item.get("score", 0.0))))
        else:
            name, score = item
            out.append((str(name), float(score)))
    return out


def _move(rank_a, rank_b) -> str:
    if rank_a is None:
        return "new in B"
    if rank_b is None:
        return "only in A"
    if rank_a == rank_b:
        return "="
    return f"up {rank_a - rank_b}" if rank_b < rank_a else f"down {rank_b - rank_a}"


def ranks(a, b) -> list:
    """Rows {"item", "rank_a", "score_a", "rank_b", "score_b", "move"} for every item in
    either list (ranks from 1; None where a list lacks it), in B's order then A's leftovers.
    Works on zero-shot [(label, p)] and fill-mask [{"token_str", "score"}] lists."""
    a, b = _pairs(a), _pairs(b)
    where_a = {name: (i + 1, s) for i, (name, s) in enumerate(a)}
    where_b = {name: (i + 1, s) for i, (name, s) in enumerate(b)}
    order = [n for n, _ in b] + [n for n, _ in a if n not in where_b]
    rows = []
    for name in order:
        ra, sa = where_a.get(name, (None, None))
        rb, sb = where_b.get(name, (None, None))
        rows.append({"item": name, "rank_a": ra, "score_a": sa, "rank_b": rb, "score_b": sb,
                     "move": _move(ra, rb)})
    return rows


@dataclass
class RetrievalDiff:
    k: int
    overlap: float               # |top-k of A and B| / k (or the lists' length when shorter)
    kept: list = field(default_factory=list)      # [(id, rank A, rank B)]
    gained: list = field(default_factory=list)    # ids in B's top k only
    lost: list = field(default_factory=list)      # ids in A's top k only

    def as_dict(self) -> dict:
        return {"k": self.k, "overlap": self.overlap, "kept": self.kept,
                "gained": self.gained, "lost": self.lost}


def retrieval(a: list, b: list, k: int | None = None) -> RetrievalDiff:
    """Compare two ranked result lists (ids, or (id, score) pairs) at k (default: the
    longer list's length)."""
    ids_a = [x[0] if isinstance(x, (tuple, list)) else x for x in a]
    ids_b = [x[0] if isinstance(x, (tuple, list)) else x for x in b]
    k = k or max(len(ids_a), len(ids_b), 1)
    top_a, top_b = ids_a[:k], ids_b[:k]
    in_b = {pid: i + 1 for i, pid in enumerate(top_b)}
    kept = [(pid, i + 1, in_b[pid]) for i, pid in enumerate(top_a) if pid in in_b]
    shown = max(min(k, max(len(top_a), len(top_b))), 1)     # lists shorter than k (few items)
    return RetrievalDiff(k, len(kept) / shown, kept,
                         [pid for pid in top_b if pid not in set(top_a)],
                         [pid for pid in top_a if pid not in in_b])
