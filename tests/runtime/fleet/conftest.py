from __future__ import annotations

from tests.fleet_etcd import etcd_fixture

etcd = etcd_fixture(1)  # one member, fresh for each test
etcd3 = etcd_fixture(3)  # three members, fresh for each test
