"""free_port never repeats itself and stays clear of the kernel's ephemeral range."""

from unimodel.local.procs import _ephemeral_range, free_port, port_in_use


def test_free_ports_are_distinct_bindable_and_not_ephemeral() -> None:
    lo, hi = _ephemeral_range()
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(not lo <= p <= hi for p in ports)
    assert not any(port_in_use(p) for p in ports[-5:])
