"""What crosses the wire: Flower records <-> tensors (``records``), the push/pull loop
(``exchange``), and the typed messages of each design (one module per design)."""
