"""Every text-protocol command through pymemcache, a third-party client.

Usage: python3 pymemcache_check.py PORT   (exit status 0 = all checks held)
"""
import sys

from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheIllegalInputError


def check(port: int) -> None:
    c = Client(("127.0.0.1", port), connect_timeout=5, timeout=5)
    assert c.version().startswith(b"1.6.18-memdial"), c.version()

    # set / get / get_many, binary-safe values
    assert c.set("a", b"1", noreply=False) is True
    assert c.get("a") == b"1"
    assert c.set("bin", b"x\r\ny\x00z", noreply=False)
    assert c.get_many(["a", "bin", "missing"]) == {"a": b"1", "bin": b"x\r\ny\x00z"}
    assert c.get("missing") is None

    # add / replace / append / prepend
    assert c.add("a", b"2", noreply=False) is False
    assert c.add("new", b"n", noreply=False) is True
    assert c.replace("missing", b"x", noreply=False) is False
    assert c.replace("a", b"r", noreply=False) is True
    assert c.append("a", b"z", noreply=False) is True
    assert c.prepend("a", b"p", noreply=False) is True
    assert c.get("a") == b"prz"

    # gets / cas
    value, token = c.gets("a")
    assert value == b"prz" and token is not None
    assert c.cas("a", b"c1", token, noreply=False) is True
    assert c.cas("a", b"c2", token, noreply=False) is False  # EXISTS
    assert c.cas("nokey", b"c", b"1", noreply=False) is None  # NOT_FOUND
    assert c.get("a") == b"c1"
    many = c.gets_many(["a", "new"])
    assert set(many) == {"a", "new"} and many["new"][0] == b"n"

    # incr / decr
    c.set("n", b"10", noreply=False)
    assert c.incr("n", 5, noreply=False) == 15
    assert c.decr("n", 100, noreply=False) == 0
    assert c.incr("missing", 1, noreply=False) is None
    c.set("text", b"abc", noreply=False)
    try:
        c.incr("text", 1, noreply=False)
        raise AssertionError("incr on text succeeded")
    except MemcacheClientError as e:
        assert b"non-numeric" in str(e).encode(), e

    # touch / gat / gats / delete
    assert c.touch("a", 100, noreply=False) is True
    assert c.touch("missing", 1, noreply=False) is False
    # pymemcache has no gat/gats methods; raw_command sends them as given
    # and returns the reply up to its end token.
    assert c.raw_command(b"gat 100 a", b"END\r\n") == b"VALUE a 0 2\r\nc1\r\n"
    gats = c.raw_command(b"gats 100 a missing", b"END\r\n").split(b"\r\n")
    assert gats[0].startswith(b"VALUE a 0 2 ") and gats[1:] == [b"c1", b""], gats
    assert c.delete("a", noreply=False) is True
    assert c.delete("a", noreply=False) is False
    assert c.get("a") is None

    # noreply writes land
    c.set("q", b"quiet", noreply=True)
    assert c.get("q") == b"quiet"
    c.delete("q", noreply=True)
    assert c.get("q") is None

    # expiry: negative is gone at once
    c.set("exp", b"x", expire=-1, noreply=False)
    assert c.get("exp") is None

    # stats / stats settings
    stats = c.stats()
    assert stats[b"curr_connections"] >= 1, stats
    assert stats[b"cmd_get"] > 0 and stats[b"get_hits"] > 0 and stats[b"get_misses"] > 0, stats
    settings = c.stats("settings")
    assert settings[b"item_size_max"] == 1048576, settings

    # the store's own stats (with arguments) and cache_memlimit
    items = c.stats("items")
    assert items[b"items:1:number"] >= 1, items
    slabs = c.stats("slabs")
    assert slabs[b"active_slabs"] >= 1, slabs
    assert c.stats("sizes") == {b"sizes_status": b"disabled"}
    assert c.cache_memlimit(64) is True

    # limits: key length enforced by the client, value size by the server
    try:
        c.set("k" * 251, b"x", noreply=False)
        raise AssertionError("long key accepted")
    except MemcacheIllegalInputError:
        pass
    try:
        c.set("huge", b"x" * (2 * 1024 * 1024), noreply=False)
        raise AssertionError("2 MiB value accepted")
    except Exception as e:  # pymemcache raises MemcacheServerError
        assert "too large" in str(e), e
    assert c.get("huge") is None

    # flush_all
    assert c.flush_all(noreply=False) is True
    assert c.get("new") is None

    # verbosity, then quit closes
    c.quit()
    print("pymemcache: all checks passed")


if __name__ == "__main__":
    check(int(sys.argv[1]))
