//! segsync keeps contact lists on the Qlara / LORA partner gateway in sync with segment rules
//! written in Rhai. The modules, in reading order:

pub mod cli; // clap subcommands and their exit codes
pub mod config; // config.toml → validated Config
pub mod contact; // the contact record both the gateway and the rules speak
pub mod daemon;
pub mod endpoint;
pub mod files; // reading config, rule and key files without blocking // Config → a gateway: the real one or the bundled sandbox
pub mod gateway; // the partner-gateway client: pagination, rate budget, retries
pub mod ids; // ContactId, ListId, RuleName
pub mod logging; // JSON or text logs, RUST_LOG filtering
pub mod reconcile;
pub mod rules; // Rhai rule files: load, validate, evaluate, test
pub mod schedule; // cron schedules and rule-file watching
pub mod state; // SQLite: bindings, run history, instance lock // plan (pure) and apply: making a list hold what its rule selects // `segsync run`: events, signals, reload, shutdown, systemd
