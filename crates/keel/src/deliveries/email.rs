//! Email over SMTP with `lettre`: STARTTLS (required) or plain, per sender, with a text part
//! and an HTML part (the text, escaped, in a `<pre>`).

use std::time::{Duration, Instant};

use keel_store::notifications::model::Delivery;
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::json;

use super::address::{AddressPolicy, Refused};
use super::channels::{Outcome, millis};
use crate::notifications::settings::{Sender, SmtpTls};

/// The SMTP port when the sender names none.
pub const DEFAULT_PORT: u16 = 587;

/// Sends `delivery` to its recipient through `sender`'s SMTP server. The server's address
/// must be one `policy` permits, as for webhooks: the host is resolved once, checked, and the
/// connection goes to the checked address (STARTTLS still verifies the host's name).
pub async fn send(
    delivery: &Delivery,
    sender: &Sender,
    password: Option<String>,
    policy: &AddressPolicy,
    timeout: Duration,
) -> Outcome {
    let (Some(host), Some(from)) = (&sender.host, &sender.from) else {
        return Outcome::failed("the email sender has no host or From address", false);
    };
    let message = match message(delivery, from) {
        Ok(message) => message,
        Err(error) => return Outcome::failed(error, false),
    };
    let port = sender.port.unwrap_or(DEFAULT_PORT);
    let addresses = match policy.resolve(host, port).await {
        Ok(addresses) => addresses,
        // A refused address stays refused until the configuration changes; a name that does
        // not resolve now may later.
        Err(error) => {
            let refused = error.downcast_ref::<Refused>().is_some();
            return Outcome::failed(format!("SMTP host {host}: {error}"), !refused);
        }
    };
    let tls = match sender.tls.unwrap_or(SmtpTls::Starttls) {
        SmtpTls::Starttls => match TlsParameters::new(host.clone()) {
            Ok(parameters) => Tls::Required(parameters),
            Err(error) => return Outcome::failed(format!("SMTP relay {host}: {error}"), false),
        },
        SmtpTls::Plain => Tls::None,
    };
    let started = Instant::now();
    let mut outcome = Outcome::failed(format!("SMTP host {host}: no address"), true);
    // Each permitted address in turn, while the connection is what fails.
    for address in addresses {
        let mut builder =
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(address.ip().to_string())
                .port(port)
                .tls(tls.clone())
                .timeout(Some(timeout));
        if let (Some(user), Some(password)) = (&sender.username, &password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        let error = match builder.build().send(message.clone()).await {
            Ok(response) => {
                return Outcome::Delivered(json!({
                    "status": u16::from(response.code()),
                    "duration_ms": millis(started.elapsed()),
                    "response": response.message().collect::<Vec<_>>().join(" "),
                }));
            }
            Err(error) => error,
        };
        let unreachable = !(error.is_response()
            || error.is_transient()
            || error.is_permanent()
            || error.is_client()
            || error.is_tls()
            || error.is_timeout());
        outcome = Outcome::Failed {
            detail: json!({
                "error": error.to_string(),
                "status": error.status().map(u16::from),
                "duration_ms": millis(started.elapsed()),
            }),
            // A 5xx refusal of the server stays a refusal; a 4xx or a lost connection may pass.
            retryable: !error.is_permanent(),
            retry_after: None,
        };
        if !unreachable {
            break;
        }
    }
    outcome
}

fn message(delivery: &Delivery, from: &str) -> Result<Message, String> {
    let from: Mailbox = from.parse().map_err(|e| format!("From `{from}`: {e}"))?;
    let to: Mailbox = delivery
        .recipient
        .parse()
        .map_err(|e| format!("recipient `{}`: {e}", delivery.recipient))?;
    let html = format!("<pre>{}</pre>", escape_html(&delivery.body));
    Message::builder()
        .from(from)
        .to(to)
        .subject(delivery.subject.clone())
        .message_id(Some(format!("<{}@keel>", delivery.id)))
        .multipart(MultiPart::alternative_plain_html(
            delivery.body.clone(),
            html,
        ))
        .map_err(|e| format!("building the message: {e}"))
}

/// The text with `& < > " '` escaped for HTML.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html("<b>a & 'b'</b>"),
            "&lt;b&gt;a &amp; &#39;b&#39;&lt;/b&gt;"
        );
    }
}
