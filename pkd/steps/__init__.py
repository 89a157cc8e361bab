"""Pipeline steps. Each reads the previous step's artifact folder and writes its own; steps never
import one another (they share data only through artifacts and manifests)."""
