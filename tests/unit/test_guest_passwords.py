"""compute/guest_passwords.py's checks: an account name and a password are refused before
anything reaches the guest when they could do more than set one password (chpasswd reads
``user:password`` lines), and the refusal names the field."""

from __future__ import annotations

import pytest

from cna_agent.compute.guest_passwords import validate
from cna_agent.errors import InvalidArgument


@pytest.mark.parametrize("user", ["", "a:b", "root\nother", " root", "root ", "caf\u00e9", "x" * 65, "../etc", "$(id)"])
def test_account_names_that_are_not_one_plain_name_are_refused(user: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate(user, "pw", False)
    assert exc.value.field == "user"


@pytest.mark.parametrize("user", ["root", "cna-admin", "Administrator", "svc.backup", "DOMAIN user", "john@corp", "win$"])
def test_posix_and_windows_account_names_pass(user: str) -> None:
    validate(user, "Secr3t:with colon", False)


@pytest.mark.parametrize("password,crypted", [("", False), ("a\nroot:x", False), ("a\rb", False), ("a\x00b", False),
                                               ("x" * 257, False), ("plain", True), ("$6$salt$h\n", True)])
def test_passwords_that_could_end_the_line_or_are_not_a_hash_are_refused(password: str, crypted: bool) -> None:
    with pytest.raises(InvalidArgument) as exc:
        validate("root", password, crypted)
    assert exc.value.field == "password"


def test_a_crypt_hash_and_a_unicode_password_pass() -> None:
    validate("root", "$6$cnaguestsalt0001$S0m3.Hash/Value", True)
    validate("root", "p\u00e4ssw\u00f6rd \u5bc6\u7801", False)
