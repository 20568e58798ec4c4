//! mqtt-connector: RabbitMQ "send" jobs in, acknowledged MQTT publishes out, results on the reply queue.
//!
//! The flow of one job, top to bottom:
//! - [`amqp::consumer`] receives a delivery from the request queue,
//! - [`job`] decodes it, [`connectors`] supplies the named defaults, [`policy`] holds it to the
//!   trust boundary (keys, files, secrets, brokers), [`job`] merges and validates,
//! - [`pipeline`] publishes it through [`mqtt::pool`] (retries, backoff, the job's timeout) and
//!   waits for the broker's acknowledgement ([`mqtt::connection`]),
//! - [`amqp::replier`] publishes `{exit-code, message}` through [`amqp::confirms`] and waits for
//!   RabbitMQ's confirm of that very reply,
//! - [`worker`] settles the delivery ([`settle`]: ack, reject or requeue) and runs the whole loop.
//!
//! Around it: [`metrics`] (every metric name in one place), [`http`] (`/metrics`, `/healthz`,
//! `/readyz`), [`client`] (the Rust client API: submit jobs, await replies; the CLI's `submit`),
//! [`job_args`] (a job from `--set KEY=VALUE`), [`expiry`] (stale commands: `not-after`, AMQP
//! expiration), [`check`] (connector diagnosis) and [`backoff`]. Test builds with the feature
//! `soak-faults` add `fault` (switches that break the contract on purpose, for the soak's
//! self-test).

pub mod amqp;
pub mod backoff;
pub mod check;
pub mod client;
pub mod connectors;
pub mod expiry;
#[cfg(feature = "soak-faults")]
pub mod fault;
pub mod http;
pub mod job;
pub mod job_args;
pub mod log_line;
pub mod logging;
pub mod metrics;
pub mod mqtt;
pub mod outcome;
pub mod pipeline;
pub mod policy;
pub mod secret;
pub mod settle;
#[cfg(test)]
mod test_support;
pub mod worker;

/// Installs the process-wide rustls crypto provider (ring). Call once at start-up: if two
/// providers end up compiled in, rustls would otherwise panic when a TLS config is first built.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
