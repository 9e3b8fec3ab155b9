"""Test helpers shared by the suites: the scripted workload process and its handle."""
