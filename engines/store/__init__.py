"""Where vectors and outputs live: local paths and ``s3://`` behind one pyarrow filesystem
(``storage``), and the contract-stamped store of Lance tables (``vector_store``) that the
episode job's sink and the gallery of known identities share."""
