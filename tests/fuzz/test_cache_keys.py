"""Redis keys of different users never meet, whatever the user ids look like.

User ids are any printable ASCII, ':' included, so a key of one user must not be spellable
as another key of someone else: user "blocked:alice"'s cached token used to be alice's
revoke block (refusing alice's cache), and reading it back as a token deleted a block.
"""

from __future__ import annotations

import pytest
import redis
from hypothesis import example, given
from hypothesis import strategies as st

from tests.support.fuzz_strategies import FUZZ
from tests.support.service_world import ServiceWorld
from token_manager.cache import blocked_key, lock_key, token_key, unstored_refresh_key

pytestmark = pytest.mark.integration

USER_KEYS = (token_key, blocked_key, lock_key, unstored_refresh_key)
user_ids = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)
prefixed = st.builds(
    lambda prefix, user: prefix + user,
    st.sampled_from(["blocked:", "token:", "refresh:", "lock:refresh:", "refresh-unstored:", "oauth:state:", ""]),
    user_ids,
)


@FUZZ
@given(first=user_ids, second=prefixed)
@example(first="alice", second="blocked:alice")
def test_no_key_of_one_user_is_a_key_of_another(first: str, second: str) -> None:
    if first == second:
        return
    keys = [key(user) for user in (first, second) for key in USER_KEYS]
    assert len(set(keys)) == len(keys), keys


def test_a_user_named_like_a_block_key_does_not_block_another_users_cache(world: ServiceWorld) -> None:
    world.link("alice")
    world.link("blocked:alice")
    world.fetch("blocked:alice")  # its cached token must not land on alice's block

    world.fetch("alice")

    assert redis.Redis.from_url(world.redis_url).exists(token_key("alice")) == 1
