//! TLS on the gRPC port, and mutual TLS: certificates made for the test by
//! a throwaway CA.

mod support;

use std::{path::Path, time::Duration};

use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use rigger_inference::proto::{GetStatusRequest, inference_service_client::InferenceServiceClient};
use support::{TestServer, config, free_port};
use tonic::transport::{Certificate as CaCertificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).unwrap();
        Self { ca, ca_key }
    }

    /// A certificate for `name` signed by the CA: (certificate PEM, key PEM).
    fn issue(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec![name.to_owned()])
            .unwrap()
            .signed_by(&key, &self.ca, &self.ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path.to_str().unwrap().to_owned()
}

async fn tls_client(
    server: &TestServer,
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<InferenceServiceClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(CaCertificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await?;
    Ok(InferenceServiceClient::new(channel))
}

/// GetStatus until the backends are selected; the first error that is not
/// "starting" is returned.
async fn status(client: &mut InferenceServiceClient<Channel>) -> Result<(), tonic::Status> {
    for _ in 0..200 {
        match client.get_status(GetStatusRequest {}).await {
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other.map(|_| ()),
        }
    }
    Err(tonic::Status::deadline_exceeded(
        "the server never finished starting",
    ))
}

#[tokio::test]
async fn tls_and_mutual_tls_on_the_grpc_port() {
    let dir = std::env::temp_dir().join(format!("rigger-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pki = Pki::new();
    let ca_pem = pki.ca.pem();
    let (server_cert, server_key) = pki.issue("localhost");
    let (client_cert, client_key) = pki.issue("orchestrator");
    let cert = write(&dir, "server.pem", &server_cert);
    let key = write(&dir, "server.key", &server_key);
    let ca = write(&dir, "ca.pem", &ca_pem);
    let no_ollama = format!("127.0.0.1:{}", free_port());
    let base = ["--backend", "ollama", "--ollama-host", &no_ollama];

    let mut flags = base.to_vec();
    flags.extend(["--tls-cert", &cert, "--tls-key", &key]);
    let server = TestServer::spawn(config(&flags)).await;
    let mut client = tls_client(&server, &ca_pem, None)
        .await
        .expect("TLS connects");
    status(&mut client).await.expect("calls work over TLS");
    let mut plain =
        InferenceServiceClient::new(Channel::from_shared(server.url()).unwrap().connect_lazy());
    assert!(
        plain.get_status(GetStatusRequest {}).await.is_err(),
        "plaintext is refused"
    );
    drop(server);

    flags.extend(["--tls-client-ca", &ca]);
    let server = TestServer::spawn(config(&flags)).await;
    let refused = match tls_client(&server, &ca_pem, None).await {
        Ok(mut client) => status(&mut client).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate is refused");
    let mut client = tls_client(&server, &ca_pem, Some((&client_cert, &client_key)))
        .await
        .expect("mutual TLS connects");
    status(&mut client)
        .await
        .expect("calls work over mutual TLS");
    let _ = std::fs::remove_dir_all(dir);
}
