"""The members of an etcd cluster and each one's status and health (for `hsm-domain status`).

Invariants: a member's status is asked of that member only (never failed over: the question is
about it), bounded by the client's `attempt_timeout`; an unreachable member is a status with
`reachable` False and the reason, never an exception; healthy means what `etcdctl endpoint
health` means: it answers, knows a leader, raises no alarm, and serves a linearizable read.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from aetcd import rpc

from domain_edge.etcd._client import ABORTABLE, REQUIRE_LEADER, EtcdClient, cause_of
from domain_edge.etcd._errors import short


@dataclass(frozen=True)
class MemberInfo:
    """One member as the cluster lists it."""

    member_id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]


@dataclass(frozen=True)
class MemberStatus:
    """What one endpoint said about itself (or why it said nothing)."""

    endpoint: str
    reachable: bool
    healthy: bool
    detail: str
    member_id: int = 0
    leader_id: int = 0
    raft_term: int = 0
    raft_index: int = 0
    db_size: int = 0
    version: str = ""

    @property
    def is_leader(self) -> bool:
        return self.reachable and self.member_id != 0 and self.member_id == self.leader_id


def members(client: EtcdClient) -> list[MemberInfo]:
    """The cluster's members (asked of any member that answers)."""

    async def call(member: Any, timeout: float) -> Any:
        return await member.clusterstub.MemberList(
            rpc.MemberListRequest(), timeout=timeout, metadata=REQUIRE_LEADER
        )

    async def ask() -> list[MemberInfo]:
        response, _ = await client.failover("the member list", call, resend_unknown=True)
        return [
            MemberInfo(int(m.ID), str(m.name), tuple(m.peerURLs), tuple(m.clientURLs))
            for m in response.members
        ]

    return client.run(ask())


async def _status(client: EtcdClient, index: int) -> MemberStatus:
    endpoint = str(client.endpoints[index])
    timeout = client.attempt_timeout
    try:
        member = await client.member_client(index)
        status = await member.maintenancestub.Status(rpc.StatusRequest(), timeout=timeout)
    except ABORTABLE as error:
        return MemberStatus(endpoint, False, False, f"unreachable: {short(cause_of(error))}")
    alarms = [str(e) for e in getattr(status, "errors", ())]
    healthy, detail = True, "healthy"
    if int(status.leader) == 0:
        healthy, detail = False, "no leader"
    elif alarms:
        healthy, detail = False, "alarm: " + "; ".join(alarms)[:200]
    else:
        try:
            await member.kvstub.Range(
                rpc.RangeRequest(key=b"health"), timeout=timeout, metadata=REQUIRE_LEADER
            )
        except ABORTABLE as error:
            healthy, detail = False, f"cannot serve a read: {short(cause_of(error))}"
    return MemberStatus(
        endpoint,
        True,
        healthy,
        detail,
        int(status.header.member_id),
        int(status.leader),
        int(status.raftTerm),
        int(status.raftIndex),
        int(status.dbSize),
        str(status.version),
    )


def member_status(client: EtcdClient, index: int) -> MemberStatus:
    """The status of endpoint `index` (0-based, in the client's order)."""
    return client.run(_status(client, index))


def cluster_status(client: EtcdClient) -> list[MemberStatus]:
    """Every endpoint's status, asked concurrently, in the client's order."""

    async def ask_all() -> list[MemberStatus]:
        return list(
            await asyncio.gather(*(_status(client, i) for i in range(len(client.endpoints))))
        )

    return client.run(ask_all())
