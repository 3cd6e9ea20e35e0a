"""Ctrl-C while cna-ctl follows an operation (cli/progress.py): the admin is asked, and told
what became of the operation in the agent's words; nothing is cancelled without a yes. The
real terminal path (tmux, a stuck import) is tests/e2e/test_cli_terminal.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from cna_agent.api import pb
from cna_agent.cli.common import CliError
from cna_agent.cli.progress import EXIT_INTERRUPTED, interrupted, on_interrupt

ops_pb = pb.operations_pb2


class _Client:
    def __init__(self, answer=None, refuse: str = "") -> None:
        self.cancelled: list[str] = []
        self.answer, self.refuse = answer, refuse
        self.ops = SimpleNamespace(CancelOperation="CancelOperation")

    def call(self, method, request, **kw):
        assert method == "CancelOperation"
        self.cancelled.append(request.id)
        if self.refuse:
            raise CliError(self.refuse)
        return self.answer


OP = ops_pb.Operation(id="op-1", kind="volume.import")


def test_no_answer_or_no_leaves_it_running_and_says_how_to_follow_it():
    client = _Client()
    for ask in (lambda q: None, lambda q: False):
        text = interrupted(client, OP, ask)
        assert "keeps running" in text and "cna-ctl ops show -w op-1" in text
    assert client.cancelled == []


def test_yes_cancels_and_reports_the_outcome_or_the_refusal():
    done = _Client(answer=ops_pb.Operation(id="op-1", done=True, state=ops_pb.OPERATION_STATE_CANCELLED))
    assert interrupted(done, OP, lambda q: True) == "operation op-1 (volume.import) cancelled"
    assert done.cancelled == ["op-1"]
    refused = _Client(refuse="vm.delete operations cannot be cancelled once started")
    text = interrupted(refused, OP, lambda q: True)
    assert "was not cancelled: vm.delete operations cannot be cancelled" in text


def test_the_interrupt_ends_the_command_with_130():
    with pytest.raises(CliError) as exc:
        with on_interrupt(_Client(), OP, lambda q: None):
            raise KeyboardInterrupt
    assert exc.value.code == EXIT_INTERRUPTED == 130
