"""The feeder's shape as the figures draw it, from the branch labels of `Results.feeder`
("parent-child", bus numbers): laterals and each bus's distance from the substation in branches.

A lateral is a path of buses that starts at its branching bus (the substation for the main line)
and goes on, at each bus, into the child with the deepest subtree (ties: the lower bus number); every
other child starts a lateral of its own. Drawn one line per lateral, a voltage profile never joins
two buses that are not connected.
"""

from __future__ import annotations

from p2pdoe.core.schemas.results import FeederInfo


def parent_of(feeder: FeederInfo) -> dict[int, int]:
    """Each bus's parent bus (the root has none)."""
    pairs = (label.split("-") for label in feeder.branches)
    return {int(child): int(parent) for parent, child in pairs}


def children_of(feeder: FeederInfo) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {b: [] for b in feeder.bus_ids}
    for child, parent in parent_of(feeder).items():
        children[parent].append(child)
    return {b: sorted(c) for b, c in children.items()}


def root_bus(feeder: FeederInfo) -> int:
    parents = parent_of(feeder)
    return next(b for b in feeder.bus_ids if b not in parents)


def hops_from_root(feeder: FeederInfo) -> dict[int, int]:
    """Branches between each bus and the substation."""
    children, hops = children_of(feeder), {root_bus(feeder): 0}
    stack = [root_bus(feeder)]
    while stack:
        bus = stack.pop()
        for child in children[bus]:
            hops[child] = hops[bus] + 1
            stack.append(child)
    return hops


def laterals(feeder: FeederInfo) -> list[list[int]]:
    """The main line first, then each lateral from its branching bus, in order of branching."""
    children, depth = children_of(feeder), _subtree_depths(feeder)
    paths: list[list[int]] = []
    starts: list[tuple[int, int | None]] = [(root_bus(feeder), None)]
    while starts:
        bus, branching = starts.pop(0)
        path = [] if branching is None else [branching]
        while True:
            path.append(bus)
            if not children[bus]:
                break
            ahead = max(children[bus], key=lambda c: (depth[c], -c))
            starts.extend((c, bus) for c in children[bus] if c != ahead)
            bus = ahead
        paths.append(path)
    return paths


def _subtree_depths(feeder: FeederInfo) -> dict[int, int]:
    """Branches from each bus down to the farthest bus below it."""
    children, hops = children_of(feeder), hops_from_root(feeder)
    depth: dict[int, int] = {}
    for bus in sorted(hops, key=hops.__getitem__, reverse=True):  # leaves first
        depth[bus] = max((depth[c] + 1 for c in children[bus]), default=0)
    return depth
