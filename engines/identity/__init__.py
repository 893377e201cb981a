"""Known identities: the gallery (templates + members in a contract-stamped vector store),
1:N search, clustering of unknown tracks and screen time. No Ray: both shells use it,
through the ``engines`` facade."""
