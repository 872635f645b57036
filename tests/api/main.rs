mod azure_blob;
mod contract_ledger;
mod contract_queue;
mod contract_wal;
mod ingest;
mod processing;
mod seed_routes;
mod support;
