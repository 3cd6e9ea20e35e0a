"""SetGuestPassword: a guest user's password set through the guest agent (guest-set-user-password,
which runs chpasswd in a Linux guest and NetUserSetInfo in a Windows one).

Why an operation of its own, and why it keeps nothing: it changes the guest, so it is journaled
like every change (an idempotent retry, an audit event naming the VM and the user), but the
password is a secret. It is never in the operation's metadata, its events or the agent's log;
the request's fingerprint is taken without it (the journal would otherwise hold a hash an
attacker could test guesses against), so a retry with the same request_id and another password
is answered with the first attempt's outcome. Names and passwords are checked before anything is
sent: chpasswd reads ``user:password`` lines, so a newline in either would set a second account.
"""

from __future__ import annotations

import re
from typing import Any

import libvirt

from cna_agent.compute import state as st
from cna_agent.compute.guest_agent import READ_DEADLINE_S, GuestAgents
from cna_agent.compute.vmops import VmOps
from cna_agent.errors import CODES, FailedPrecondition, InvalidArgument
from cna_agent.operations import OperationContext, RecoveryHandler
from cna_agent.state.journal import OperationError, OperationRecord

KIND = "vm.guest.password"
#: POSIX and Windows account names: letters, digits, . _ - @ $ and inner spaces, 1-64 long.
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@$ -]{0,63}$")
#: A crypt(3) hash as chpasswd -e takes it: $id$[params$]salt$hash.
CRYPTED_RE = re.compile(r"^\$[0-9a-z]{1,3}\$[./A-Za-z0-9$=,+-]{8,500}$")
MAX_PASSWORD = 256


def validate(user: str, password: str, crypted: bool) -> None:
    if not _USER_RE.match(user) or user != user.rstrip():
        raise InvalidArgument("user", "must be 1-64 characters of A-Z a-z 0-9 . _ - @ $ and inner spaces "
                                      "(an account name in the guest)")
    if not password:
        raise InvalidArgument("password", "must not be empty")
    if len(password) > MAX_PASSWORD and not crypted:
        raise InvalidArgument("password", f"must be at most {MAX_PASSWORD} characters")
    if any(ord(c) < 0x20 or ord(c) == 0x7f for c in password):
        raise InvalidArgument("password", "must not contain control characters (a newline would end the guest's "
                                          "user:password line)")
    if crypted and not CRYPTED_RE.match(password):
        raise InvalidArgument("password", "with crypted, must be a crypt(3) hash such as $6$salt$hash")


class GuestPasswords:
    def __init__(self, ops: VmOps, agents: GuestAgents) -> None:
        self.ops = ops
        self.agents = agents

    async def set_password(self, ref: str, user: str, password: str, *, crypted: bool = False, request_id: str = "",
                           fingerprint: str = "", lock_timeout: float = 0.0) -> OperationRecord:
        validate(user, password, crypted)
        uuid, name = await self.ops.inventory.lookup_uuid(ref)
        if request_id and (prior := await self.ops.earlier(request_id, (KIND,), fingerprint)) is not None:
            return prior
        spec = (await self.ops.inventory.definition(uuid)).spec
        if spec is not None and not spec.guest_agent:
            raise FailedPrecondition(f"vm {name!r} has no guest agent channel (spec.guest_agent is off)", field="vm")
        if await self.ops.inventory.state(uuid) != st.RUNNING:
            raise FailedPrecondition(f"vm {name!r} is not running; a password is set through its guest agent", field="vm")
        flags = libvirt.VIR_DOMAIN_PASSWORD_ENCRYPTED if crypted else 0

        async def work(op: OperationContext) -> Any:
            def call(conn: libvirt.virConnect) -> None:
                conn.lookupByUUIDString(uuid).setUserPassword(user, password, flags)

            try:
                await self.ops.hv.call(call, timeout=READ_DEADLINE_S, what="setting a guest password", pool=self.agents.pool)
            except libvirt.libvirtError as exc:
                raise FailedPrecondition(f"the guest agent of vm {name!r} did not set the password of {user!r}: "
                                         f"{exc.get_error_message()}", field="user") from None
            await self.ops.events.publish("vm.guest.password_set", resource_kind="vm", resource_id=uuid,
                                          resource_name=name, message=f"{name}: password of {user} set through the guest agent",
                                          attributes={"user": user, "crypted": str(crypted).lower()}, operation_id=op.id)
            return None

        return await self.ops.submit("vm.guest.password", uuid, work, request_id=request_id, fingerprint=fingerprint,
                                     lock_timeout=lock_timeout, metadata={"user": user})

    def handlers(self) -> dict[str, RecoveryHandler]:
        return {KIND: self.recover}

    async def recover(self, record: OperationRecord) -> Any:
        """Whether the guest took a password cannot be read back (nor should it be): ABORTED."""
        return OperationError(CODES["ABORTED"], f"the agent stopped while setting the password of "
                                         f"{record.metadata.get('user', '?')!r}; whether the guest took it cannot be "
                                         f"told (repeat SetGuestPassword)")
