"""Firecracker's UFFD memory backend: uffdd as the page-fault handler of restored VMs."""
