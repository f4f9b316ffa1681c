"""The bottom layer: what a sweep is (spec, plan, search planning), the tag and state schema it
records, and where things are (address predicates). Imports none of ray, mlflow or torch, so
planning a sweep needs neither Ray, MLflow nor torch."""
