"""Can a trial ever be scheduled, and how many run at once? The sweep's `resources` against the
Ray cluster's nodes.

Tune places each trial's request ({cpu, gpu, memory}) on ONE node, so a request that no single
node holds waits forever, however much the cluster has in sum: a trial of `{cpu: 4, gpu: 0.25}`
needs one node with at least 0.25 GPU and 4 CPUs. The check runs before the sweep starts, from
the nodes' total resources (not what is free now: busy nodes free up, missing ones never come).

    largest_node_fit(ray.nodes(), {"cpu": 4, "gpu": 0.25})  -> None, or one line naming resources.<field>
    check_trials_fit({"cpu": 4, "gpu": 0.25}, autoscaling)  -> raises BnewError when no node ever will
    packed_slots(ray.nodes(), {"cpu": 4, "gpu": 0.25})      -> trials at once (the cost estimate's slots)

Nodes that join later: Ray 2.60 gives a driver no reliable sign that a cluster autoscales (the v1
autoscaler keeps its node types and max_workers to itself; the v2 one reports them to the GCS only
in releases after 2.60). `autoscaler_node_types` reads that report where there is one; otherwise
the caller says so (`autoscaling=True`, e.g. from a --wait-for-resources flag).
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Iterable

from bnew_core.config import BnewError
from sweeps.core.addresses import cluster_address
from sweeps.core.spec import SweepSpec

RAY_NAMES = {"cpu": "CPU", "gpu": "GPU", "memory": "memory"}
"""`resources.<field>` of a sweep spec -> Ray's resource name (memory in bytes, as Ray counts it)."""
BLAME_ORDER = ("cpu", "memory", "gpu")
"""When several fields fall short, name first the one the GPU nodes lack beside their GPUs: "ask
for fewer CPUs" is the fix at hand, "get bigger GPU nodes" the last resort."""
TOLERANCE = 1e-6  # Ray keeps resources to 1e-4; 0.25 * 4 GPUs must fit 1 GPU exactly


def amount(field: str, value: float) -> str:
    """A quantity in words: "4 CPUs", "0.25 GPU", "7.5 GiB of memory"."""
    if field == "memory":
        return f"{value / 2**30:.3g} GiB of memory"
    plural = "s" if field in ("cpu", "gpu") and not 0 < value <= 1 else ""
    return f"{value:g} {RAY_NAMES.get(field, field)}{plural}"


def have(node: dict[str, float], field: str) -> float:
    return node.get(RAY_NAMES.get(field, field), 0.0)


def holds(node: dict[str, float], request: dict[str, float], fields: Iterable[str]) -> bool:
    """Whether a node's total resources cover `request` on `fields`."""
    return all(have(node, field) + TOLERANCE >= request[field] for field in fields)


def largest_node_fit(nodes: list[dict[str, Any]], request: dict[str, float]) -> str | None:
    """None when one alive node of `ray.nodes()` holds all of `request` ({cpu, gpu, memory}), else
    one line: the `resources.<field>` that no node has beside the rest, what the best node has, the fix."""
    wanted = {field: value for field, value in request.items() if value > 0}
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive", True)]
    if any(holds(node, wanted, wanted) for node in alive):
        return None
    if not alive:
        return "resources: the Ray cluster has no alive node"
    for field in sorted(wanted, key=lambda name: BLAME_ORDER.index(name) if name in BLAME_ORDER else len(BLAME_ORDER)):
        others = [other for other in wanted if other != field]
        # `field` falls short on every node that holds the rest (else that node would fit); when no
        # node holds the rest, `field` is to blame only if no node has enough of it at all.
        candidates = [node for node in alive if holds(node, wanted, others)]
        if not candidates and any(holds(node, wanted, [field]) for node in alive):
            continue
        best = max(have(node, field) for node in candidates or alive)
        beside = (" with " + " and ".join(amount(other, wanted[other]) for other in others)
                  if candidates and others else "")
        fix = ("a cluster with GPUs, or resources.gpu: 0" if field == "gpu" and best == 0
               else f"resources.{field}: at most {format_value(field, best)}, or nodes with more")
        return (f"resources.{field}: a trial needs {amount(field, wanted[field])} on one node, but the largest "
                f"node{beside} has {amount(field, best)}; fix: {fix}")
    largest = ", ".join(amount(field, max(have(node, field) for node in alive)) for field in wanted)
    return (f"resources: no node has {', '.join(amount(f, v) for f, v in wanted.items())} together (each lacks "
            f"two or more; the largest have {largest}); fix: smaller resources, or bigger nodes")


def format_value(field: str, value: float) -> str:
    """A value as a spec takes it (memory stays in bytes, Ray's unit)."""
    return str(int(value)) if field == "memory" or value == math.floor(value) else f"{value:g}"


def trial_resources(spec: SweepSpec) -> dict[str, float]:
    """What each trial of the sweep reserves on one node, as Tune takes it and the checks read it."""
    return {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}


def packed_slots(nodes: list[dict[str, Any]], request: dict[str, float]) -> int:
    """How many trials of `request` the alive nodes of `nodes` run at once: on each node the fewest
    of its CPUs, GPUs and memory over the trial's share (a trial sits on one node), summed."""
    wanted = {field: value for field, value in request.items() if value > 0}
    return sum(min(math.floor(have(node["Resources"], field) / value + TOLERANCE) for field, value in wanted.items())
               for node in nodes if node.get("Alive", True))


def reachable_nodes(address: str) -> list[dict[str, Any]] | None:
    """The nodes of the running Ray cluster at `address` (`HOST:PORT`, `ray://HOST:PORT`), or None
    when nothing answers there (checked with a plain connection first: `ray.init` would wait and
    log errors). Connects and disconnects: for a look from a command that runs no sweep."""
    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except (OSError, ValueError):
        return None
    import ray  # heavy

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        return ray.nodes()
    except ConnectionError:
        return None
    finally:
        ray.shutdown()


def visible_slots(request: dict[str, float], address: str | None) -> tuple[int, str]:
    """How many trials of `request` run at once on the Ray cluster at `address` (else RAY_ADDRESS)
    when one answers there, else on this machine's CPUs; and which of the two it was, in words."""
    cluster = cluster_address(address)
    nodes = reachable_nodes(cluster) if cluster not in (None, "auto", "local") else None
    if nodes is not None:
        alive = [node for node in nodes if node["Alive"]]
        return packed_slots(alive, request), f"the Ray cluster at {cluster}: {len(alive)} node{'s' if len(alive) > 1 else ''}"
    cpus = os.cpu_count() or 1
    why = f"the Ray cluster at {cluster} did not answer" if cluster else "no --address or RAY_ADDRESS"
    return (packed_slots([{"Resources": {"CPU": cpus}}], request),
            f"this machine's {cpus} CPUs, GPUs not counted: {why}")


def autoscaler_node_types() -> list[dict[str, Any]]:
    """The node types an autoscaler says it can still add, as `ray.nodes()`-like entries (empty when
    none said so). Read from the ClusterConfig that Ray's v2 autoscaler writes to the GCS (after Ray
    2.60; Ray Data and Train read it the same way); `ray._private` is Ray's, so any change there
    reads as "none reported", never as an error."""
    try:
        from ray._private.state import state  # heavy

        config = state.get_cluster_config()
    except Exception:  # a Ray without it, or a GCS that cannot say
        return []
    groups = config.node_group_configs if config is not None else []
    return [{"Alive": True, "Resources": dict(group.resources)} for group in groups if group.max_count != 0]


def check_trials_fit(request: dict[str, float], autoscaling: bool = False) -> str | None:
    """Fail (BnewError) when no node of the connected Ray cluster (after `ray.init`), nor a node type
    its autoscaler reported, can ever hold one trial's `request`. None when a node holds it now;
    the line to print while Tune waits when only nodes still to come can: a node type reported by
    the autoscaler, or any node when the caller knows the cluster grows (`autoscaling`)."""
    import ray  # heavy

    problem = largest_node_fit(ray.nodes(), request)
    if problem is None:
        return None
    if largest_node_fit(autoscaler_node_types(), request) is None:
        return f"{problem}; waiting for the autoscaler to add a node that holds it"
    if autoscaling:
        return f"{problem}; waiting for such a node to join the cluster"
    raise BnewError(problem)
