"""`unimodel status`: the cluster as etcd and the services see it (services, workers and their models,
registered models, batcher queues), as a table or JSON."""
