"""The fleet: catalog and membership in etcd, capacity reports, the router."""
