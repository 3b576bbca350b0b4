"""Tests of the Helm chart, the plain manifests and the Dockerfile."""
