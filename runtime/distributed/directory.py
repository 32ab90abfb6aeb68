"""Which Quiver replicas an application has, and where their own ports are: a small named actor.

    directory(app).register.remote(replica_id, info, actor)     each replica, once it serves
    directory(app).listing.remote()                            live replicas' current info
    directory(app).replaced.remote(adapter_id) -> generation   the store's copy of an adapter
                                                               was replaced (the load route)
    directory(app).generations.remote()                        {adapter id: generation}, which
                                                               each replica polls (replica.py)

Serve's handles route and do not enumerate replicas; an operator (and the tests) need to ask
each replica what it holds (ListAdapters on its gRPC port), so replicas announce themselves
here, with their ports; what each holds is its own answer (ListAdapters). A listing pings each registered replica actor and forgets the dead ones: a replica Serve
restarted registers again under its new id.
"""
from __future__ import annotations

import ray

#: seconds a replica has to answer a listing's ping
PING_S = 2.0


@ray.remote(num_cpus=0)
class ReplicaDirectory:
    def __init__(self):
        self._replicas: dict[str, tuple[dict, ray.actor.ActorHandle]] = {}
        #: adapter id -> how many times its copy in the store was replaced through the app;
        #: a replica holding it at an older generation reloads it (absent = 0)
        self._generations: dict[str, int] = {}

    def replaced(self, adapter_id: str) -> int:
        self._generations[adapter_id] = self._generations.get(adapter_id, 0) + 1
        return self._generations[adapter_id]

    def generations(self) -> dict[str, int]:
        return dict(self._generations)

    def register(self, replica_id: str, info: dict, actor) -> None:
        self._replicas[replica_id] = (info, actor)

    async def listing(self) -> list[dict]:
        """Each live replica's info (id, node, ports), sorted by id."""
        out = []
        for replica_id, (info, actor) in list(self._replicas.items()):
            try:
                await _ping(actor)
            except Exception:  # noqa: BLE001 - dead or unreachable: forgotten
                self._replicas.pop(replica_id, None)
                continue
            out.append(info)
        return sorted(out, key=lambda i: i["replica_id"])


async def _ping(actor) -> None:
    import asyncio

    await asyncio.wait_for(actor.__ray_ready__.remote(), PING_S)


def directory(app_name: str):
    """The application's directory actor, created by whichever replica asks first. Detached
    (it outlives the replica that made it) and named after the app; `quiver serve-ray` removes
    it when it tears the app down."""
    return ReplicaDirectory.options(name=directory_name(app_name), namespace="quiver", get_if_exists=True,
                                    lifetime="detached").remote()


def directory_name(app_name: str) -> str:
    return f"quiver-replicas-{app_name}"
