"""Size the training worker group from what the cluster has, and refuse what it cannot fit.

Ray waits forever for a placement group it cannot place (its own pre-check only runs when an
autoscaler config exists), and a worker group that takes every CPU starves the Ray Data
stages feeding it, which then hang without an error. So before launching we

1. read the cluster's capacity: the autoscaler's maximum per node group when one is
   configured, otherwise the live nodes;
2. resolve the ``'auto'`` fields of :class:`ScalingConfig`: GPUs when the cluster has any,
   and ``(CPUs - data_cpus) / num_workers`` CPUs per worker (e.g. 0.5 each for 2 workers on
   a 2-CPU machine, leaving one CPU to ingest);
3. check that the workers fit: per node (a worker cannot span nodes), in total, and with
   ``data_cpus`` left over, raising :class:`InsufficientResourcesError` naming the request,
   the capacity and what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from visgen.train.config import ScalingConfig

_EPS = 1e-6


class InsufficientResourcesError(RuntimeError):
    """The training worker group asks for more than the cluster has (or can autoscale to)."""


@dataclass(frozen=True)
class NodeShape:
    """CPUs and GPUs of one node (or one autoscaler node type), and how many such nodes there may be."""

    cpus: float
    gpus: float
    count: float = 1  # math.inf for an autoscaler group without a max


@dataclass(frozen=True)
class Capacity:
    """What the cluster has, or can grow to when an autoscaler is configured."""

    nodes: tuple[NodeShape, ...]
    source: str  # "live nodes" | "autoscaler max"

    @property
    def total_cpus(self) -> float:
        return sum(n.cpus * n.count for n in self.nodes)

    @property
    def total_gpus(self) -> float:
        return sum(n.gpus * n.count for n in self.nodes)

    @property
    def max_node_cpus(self) -> float:
        return max((n.cpus for n in self.nodes), default=0.0)

    def describe(self) -> str:
        parts = [f"{n.count:g}x({n.cpus:g} CPU, {n.gpus:g} GPU)" for n in self.nodes]
        return f"{self.total_cpus:g} CPU, {self.total_gpus:g} GPU ({self.source}: {', '.join(parts) or 'no nodes'})"


@dataclass(frozen=True)
class WorkerResources:
    """The resolved request: what each of ``num_workers`` workers reserves."""

    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    placement_strategy: str = "PACK"
    notes: tuple[str, ...] = field(default=())

    @property
    def local_mode(self) -> bool:
        return self.num_workers == 0

    def describe(self) -> str:
        if self.local_mode:
            where = "GPU" if self.use_gpu else f"CPU, {max(1, int(self.cpus_per_worker))} torch thread(s)"
            return f"local mode (in the driver process, {where})"
        gpu = f", {self.gpus_per_worker:g} GPU" if self.use_gpu else ""
        return f"{self.num_workers} worker(s) x ({self.cpus_per_worker:g} CPU{gpu})"

    def to_ray(self):
        """The Ray Train V2 ``ScalingConfig`` for this request."""
        import ray.train  # ray.train: only Ray's config needs it; sizing rules stay importable without Ray

        if self.local_mode:
            return ray.train.ScalingConfig(num_workers=0, use_gpu=self.use_gpu)
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = self.gpus_per_worker
        return ray.train.ScalingConfig(num_workers=self.num_workers, use_gpu=self.use_gpu,
                                       resources_per_worker=resources,
                                       placement_strategy=self.placement_strategy)


def cluster_capacity() -> Capacity:
    """Capacity of the connected Ray cluster (``ray.init`` must have run).

    With an autoscaler (KubeRay, ``ray up``) the node types and their ``max_count`` bound what
    can ever be placed; without one, the live nodes are all there is.
    """
    import ray  # ray: only sizing against a live cluster needs it

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init() (or visgen's runtime helper) before sizing workers")
    groups = _autoscaler_groups()
    if groups:
        return Capacity(nodes=tuple(groups), source="autoscaler max")
    nodes = tuple(NodeShape(cpus=float(n["Resources"].get("CPU", 0.0)), gpus=float(n["Resources"].get("GPU", 0.0)))
                  for n in ray.nodes() if n.get("Alive"))
    return Capacity(nodes=nodes, source="live nodes")


def _autoscaler_groups() -> list[NodeShape]:
    """Node types from the autoscaler's cluster config, or [] when no autoscaler is configured."""
    try:  # private API (the same one Ray Train's own check uses); absent or changed -> no autoscaler info
        from ray._private.state import state  # ray: only with an autoscaler (private API)

        config = state.get_cluster_config()
    except Exception:
        return []
    if config is None:
        return []
    groups = []
    for g in config.node_group_configs:
        count = math.inf if g.max_count == -1 else float(g.max_count)
        if count > 0:
            groups.append(NodeShape(cpus=float(g.resources.get("CPU", 0)), gpus=float(g.resources.get("GPU", 0)), count=count))
    return groups


def resolve_scaling(cfg: ScalingConfig, capacity: Capacity | None = None) -> WorkerResources:
    """Resolve ``'auto'`` fields against ``capacity`` (default: the connected cluster) and check the fit.

    Raises :class:`InsufficientResourcesError` at once when the request cannot be placed,
    instead of letting Ray wait for resources that will never appear.
    """
    cap = capacity if capacity is not None else cluster_capacity()
    use_gpu = cap.total_gpus >= 1 if cfg.use_gpu == "auto" else bool(cfg.use_gpu)
    if cfg.num_workers == 0:
        if cfg.use_gpu is True and cap.total_gpus < 1:
            raise InsufficientResourcesError(
                f"scaling.use_gpu=true with num_workers=0 (local mode) but the cluster has no GPU ({cap.describe()}); "
                "set use_gpu to 'auto' or false")
        # Local mode reserves nothing in Ray; the CPUs are only the driver's torch thread count,
        # kept off data_cpus so the loop and the Ray Data tasks feeding it do not oversubscribe.
        if cfg.cpus_per_worker == "auto":
            cpus = float(max(1, math.floor(cap.max_node_cpus - cfg.data_cpus)))
        else:
            cpus = float(cfg.cpus_per_worker)
        return WorkerResources(0, use_gpu, cpus, 0.0, cfg.placement_strategy)

    n = cfg.num_workers
    gpus = cfg.gpus_per_worker if use_gpu else 0.0
    notes: list[str] = []
    if cfg.cpus_per_worker == "auto":
        # A GPU worker's CPUs must sit on a node with its GPU: size from those nodes only (CPU-only
        # nodes can still run the Ray Data tasks).
        hosts = [nd for nd in cap.nodes if nd.gpus >= gpus] if gpus else list(cap.nodes)
        host_cpus = sum(nd.cpus * nd.count for nd in hosts) if hosts else cap.total_cpus
        node_max = max((nd.cpus for nd in hosts), default=cap.max_node_cpus)
        spare = host_cpus - cfg.data_cpus
        if spare <= _EPS:
            raise InsufficientResourcesError(
                f"no CPU left for {n} training worker(s): the cluster has {cap.describe()} and scaling.data_cpus="
                f"{cfg.data_cpus:g} keeps {cfg.data_cpus:g} for Ray Data; lower data_cpus or add CPUs")
        # Hundredths of a CPU: Ray accepts fractions, and rounding down keeps the sum within the budget.
        cpus = math.floor(min(spare / n, node_max) * 100) / 100
        if cpus < 0.01:
            raise InsufficientResourcesError(
                f"{n} training workers would get {spare / n:.4f} CPU each ({cap.describe()}, data_cpus={cfg.data_cpus:g}); "
                "use fewer workers")
        notes.append(f"cpus_per_worker=auto -> {cpus:g} ({cap.total_cpus:g} CPUs - data_cpus {cfg.data_cpus:g}, / {n})")
    else:
        cpus = float(cfg.cpus_per_worker)
    if cfg.use_gpu == "auto":
        notes.append(f"use_gpu=auto -> {use_gpu} (cluster GPUs: {cap.total_gpus:g})")

    _check_fit(n, cpus, gpus, cfg, cap)
    return WorkerResources(n, use_gpu, cpus, gpus, cfg.placement_strategy, tuple(notes))


def _check_fit(n: int, cpus: float, gpus: float, cfg: ScalingConfig, cap: Capacity) -> None:
    request = f"{n} worker(s) x ({cpus:g} CPU{f', {gpus:g} GPU' if gpus else ''})"
    where = f"the cluster has {cap.describe()}"
    if gpus > 0 and cap.total_gpus < _EPS:
        raise InsufficientResourcesError(
            f"scaling asks for GPUs ({request}) but {where}; set scaling.use_gpu to 'auto' or false")
    # How many workers each node shape can host; a worker cannot span nodes.
    per_node = []
    for node in cap.nodes:
        fit_cpu = math.floor(node.cpus / cpus + _EPS) if cpus > 0 else math.inf
        fit_gpu = math.floor(node.gpus / gpus + _EPS) if gpus > 0 else math.inf
        per_node.append((min(fit_cpu, fit_gpu), node.count))
    if all(k == 0 for k, _ in per_node):
        raise InsufficientResourcesError(
            f"one training worker needs {cpus:g} CPU{f' and {gpus:g} GPU' if gpus else ''} on a single node, but no node "
            f"has that much ({where}); lower scaling.cpus_per_worker / gpus_per_worker")
    if cfg.placement_strategy == "STRICT_PACK":
        placeable = max(k for k, _ in per_node)
    elif cfg.placement_strategy == "STRICT_SPREAD":
        placeable = sum(c for k, c in per_node if k > 0)
    else:
        placeable = sum(k * c for k, c in per_node)
    if placeable < n:
        raise InsufficientResourcesError(
            f"the cluster can place at most {placeable:g} of the requested {request} "
            f"(placement {cfg.placement_strategy}; {where}); lower scaling.num_workers or the per-worker resources")
    if n * cpus + cfg.data_cpus > cap.total_cpus + _EPS:
        raise InsufficientResourcesError(
            f"{request} takes {n * cpus:g} CPUs and scaling.data_cpus={cfg.data_cpus:g} must stay free for Ray Data, "
            f"but {where}: the data stages feeding training would starve and hang. Lower cpus_per_worker "
            f"(or use 'auto'), num_workers or data_cpus")
