"""whereabouts-py: a cluster-wide IPAM CNI plugin, compatible with Whereabouts' IPPool format."""

__version__ = "0.1.0"
