"""The embedded local cluster: nats-server, etcd and the six services as child processes."""
