//! A small HTTP/1.1 client over the unix socket, shared by the CLI and the tests.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::proto::Envelope;

/// An answer as it came: its HTTP status and body, read by [`Answer::data`].
#[derive(Debug)]
pub struct Answer {
    /// The API or path asked, for messages.
    what: String,
    status: u16,
    body: Bytes,
}

impl Answer {
    /// The answer to `what` (an API or a path), as it came.
    pub fn new(what: impl Into<String>, status: u16, body: Bytes) -> Answer {
        Answer {
            what: what.into(),
            status,
            body,
        }
    }

    /// The envelope's `data` as `T`, read from the body's text in one pass (`T` may borrow
    /// from it); a refusal as [`ClientError::Refused`]. Only when that pass fails is the
    /// body read again, to tell a refusal or another shape from a body that is no envelope.
    pub fn data<'a, T: Deserialize<'a>>(&'a self) -> Result<T, ClientError> {
        let shape = match serde_json::from_slice::<Envelope<T>>(&self.body) {
            Ok(env) if env.result => {
                if let Some(data) = env.data {
                    return Ok(data);
                }
                // No data (or null): what `T` makes of null.
                return decode_text(&self.what, "null");
            }
            Ok(_) => None,
            Err(e) => Some(e),
        };
        let env = Client::decode(self.status, &self.body)?;
        match shape {
            Some(e) if env.result => Err(ClientError::Shape {
                what: self.what.clone(),
                error: e.to_string(),
            }),
            _ => Err(ClientError::Refused(Box::new(env))),
        }
    }
}

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to the agent at {path}: {source} (is procagentd running? set --socket or PROCAGENT_SOCKET)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP error talking to the agent: {0}")]
    Http(String),
    #[error("the agent answered {status} with a body that is not the API envelope: {body}")]
    Decode { status: u16, body: String },
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent refused the request (an error envelope, `result: false`), or a stream
    /// request answered with an error envelope instead of a stream.
    #[error("error {}: {}", .0.code, .0.message)]
    Refused(Box<Envelope<Value>>),
    /// The envelope's `data` is not the shape this client expects of `what`.
    #[error("the agent's answer to {what} is not what this procagent expects: {error}")]
    Shape { what: String, error: String },
}

/// Decode an answer's `data` (see [`Client::call_data`]) into its typed shape. Unknown
/// fields are ignored, so a newer agent's additions do not break an older client.
pub fn decode_data<T: DeserializeOwned>(what: &str, data: Value) -> Result<T, ClientError> {
    serde_json::from_value(data).map_err(|e| ClientError::Shape {
        what: what.to_string(),
        error: e.to_string(),
    })
}

/// Decode JSON text (an entry the agent wrote) into its typed shape, as [`decode_data`].
pub fn decode_text<'a, T: Deserialize<'a>>(what: &str, text: &'a str) -> Result<T, ClientError> {
    serde_json::from_str(text).map_err(|e| ClientError::Shape {
        what: what.to_string(),
        error: e.to_string(),
    })
}

/// The `data` of a successful envelope (`null` when it has none); a refusal as
/// [`ClientError::Refused`].
pub fn envelope_data(env: Envelope<Value>) -> Result<Value, ClientError> {
    if env.result {
        Ok(env.data.unwrap_or(Value::Null))
    } else {
        Err(ClientError::Refused(Box::new(env)))
    }
}

/// A client bound to one socket path.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Client {
        Client {
            socket: socket.as_ref().to_path_buf(),
            timeout: Duration::from_secs(60),
        }
    }

    /// The same client with another deadline for each request.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: self.socket.display().to_string(),
                source,
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Send one request; returns the status and the whole body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let (status, bytes) = self.raw_bytes(method, path, body).await?;
        Ok((status, bytes.to_vec()))
    }

    /// [`Client::raw`] without copying the body out of the buffer it was collected in.
    async fn raw_bytes(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Bytes), ClientError> {
        let fut = async {
            let mut sender = self.connect().await?;
            let req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "procagent")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
    }

    fn decode(status: u16, body: &[u8]) -> Result<Envelope<Value>, ClientError> {
        serde_json::from_slice(body).map_err(|_| ClientError::Decode {
            status,
            body: String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
        })
    }

    /// `POST /v1/<api>` with a JSON body (a request type of [`crate::proto`], or any JSON).
    pub async fn call<B: Serialize + ?Sized>(
        &self,
        api: &str,
        body: &B,
    ) -> Result<Envelope<Value>, ClientError> {
        let (status, bytes) = self
            .raw(
                "POST",
                &format!("/v1/{api}"),
                Some(serde_json::to_vec(body).unwrap_or_default()),
            )
            .await?;
        Self::decode(status, &bytes)
    }

    /// `GET path`, decoded as the envelope.
    pub async fn get(&self, path: &str) -> Result<Envelope<Value>, ClientError> {
        let (status, bytes) = self.raw("GET", path, None).await?;
        Self::decode(status, &bytes)
    }

    /// `POST /v1/<api>` with a typed request: the answer's `data` as the agent wrote it
    /// (a refusal is [`ClientError::Refused`]).
    pub async fn call_data<Req: Serialize + ?Sized>(
        &self,
        api: &str,
        req: &Req,
    ) -> Result<Value, ClientError> {
        envelope_data(self.call(api, req).await?)
    }

    /// `POST /v1/<api>` with a typed request, its `data` decoded as `Resp` straight from the
    /// answer's text (no `Value` tree on the way: for a thousand `procs` entries that tree
    /// was most of the CLI's time).
    pub async fn call_typed<Req: Serialize + ?Sized, Resp: DeserializeOwned>(
        &self,
        api: &str,
        req: &Req,
    ) -> Result<Resp, ClientError> {
        self.call_answer(api, req).await?.data()
    }

    /// `POST /v1/<api>` with a typed request: the whole answer, for `data` read into types
    /// that borrow from its text ([`Answer::data`]; e.g. `&RawValue` entries that are printed
    /// as they are, never copied).
    pub async fn call_answer<Req: Serialize + ?Sized>(
        &self,
        api: &str,
        req: &Req,
    ) -> Result<Answer, ClientError> {
        let (status, body) = self
            .raw_bytes(
                "POST",
                &format!("/v1/{api}"),
                Some(serde_json::to_vec(req).unwrap_or_default()),
            )
            .await?;
        Ok(Answer::new(api, status, body))
    }

    /// `GET path`: the answer's `data` as the agent wrote it.
    pub async fn get_data(&self, path: &str) -> Result<Value, ClientError> {
        envelope_data(self.get(path).await?)
    }

    /// `GET path`, its `data` decoded as `Resp` (as [`Client::call_typed`]).
    pub async fn get_typed<Resp: DeserializeOwned>(&self, path: &str) -> Result<Resp, ClientError> {
        let (status, body) = self.raw_bytes("GET", path, None).await?;
        Answer::new(path, status, body).data()
    }

    /// `GET path` and hand each line of the streamed body to `on_line` until it returns
    /// false or the stream ends. An answer that is not a stream (the API envelope of an
    /// error, e.g. a refused peer) is returned as [`ClientError::Refused`].
    pub async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), ClientError> {
        let mut sender = self.connect().await?;
        let req = hyper::Request::builder()
            .method("GET")
            .uri(path)
            .header("host", "procagent")
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = tokio::time::timeout(self.timeout, sender.send_request(req))
            .await
            .map_err(|_| ClientError::Timeout(self.timeout))?
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let status = resp.status().as_u16();
        let is_stream = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-ndjson"));
        let mut body = resp.into_body();
        if status != 200 || !is_stream {
            let bytes = tokio::time::timeout(self.timeout, body.collect())
                .await
                .map_err(|_| ClientError::Timeout(self.timeout))?
                .map_err(|e| ClientError::Http(e.to_string()))?
                .to_bytes();
            let env = Self::decode(status, &bytes)?;
            return Err(ClientError::Refused(Box::new(env)));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Http(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                buf.extend_from_slice(data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    if !on_line(&line[..line.len() - 1]) {
                        return Ok(());
                    }
                }
            }
        }
        if !buf.is_empty() {
            on_line(&buf);
        }
        Ok(())
    }
}
