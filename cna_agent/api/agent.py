"""AgentService: the agent's own machinery (the VRM link status), translated to proto."""

from __future__ import annotations

import grpc

from cna_agent.api import pb
from cna_agent.api.convert import timestamp
from cna_agent.state.store import StateStore

_STATE = {
    "disabled": pb.agent_pb2.VRM_LINK_STATE_DISABLED,
    "disconnected": pb.agent_pb2.VRM_LINK_STATE_DISCONNECTED,
    "connecting": pb.agent_pb2.VRM_LINK_STATE_CONNECTING,
    "connected": pb.agent_pb2.VRM_LINK_STATE_CONNECTED,
}


def link_status_to_pb(st) -> pb.agent_pb2.VrmLinkStatus:
    return pb.agent_pb2.VrmLinkStatus(
        state=_STATE.get(st.state, pb.agent_pb2.VRM_LINK_STATE_UNSPECIFIED),
        address=st.address, session_id=st.session_id, host_uuid=st.host_uuid,
        last_sequence=st.last_sequence, acked_sequence=st.acked_sequence, backlog=st.backlog,
        last_error=st.last_error, last_error_time=timestamp(st.last_error_time),
        connected_since=timestamp(st.connected_since), last_ack_time=timestamp(st.last_ack_time),
        last_heartbeat_time=timestamp(st.last_heartbeat_time), next_attempt_time=timestamp(st.next_attempt_time),
        connects=st.connects, failures=st.failures, events_sent=st.events_sent, heartbeats_sent=st.heartbeats_sent,
        heartbeat_interval_seconds=st.heartbeat_interval_s,
    )


class AgentServicer(pb.agent_pb2_grpc.AgentServiceServicer):
    def __init__(self, link, store: StateStore) -> None:
        self._link = link
        self._store = store

    async def GetVrmStatus(self, request: pb.agent_pb2.GetVrmStatusRequest, context: grpc.aio.ServicerContext) -> pb.agent_pb2.VrmLinkStatus:
        # status() reads the event log's last sequence: off the loop, like every store call.
        return link_status_to_pb(await self._store.run(self._link.status))
