package link

import (
	"context"
	"crypto/ed25519"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"time"
)

// Links across hosts (tcp: addresses) can be secured with the cluster
// secret (cluster.secret_env): TLS 1.3 for confidentiality, and the secret
// for authentication. There is no PKI to run: each broker makes itself an
// ephemeral certificate, the worker does not verify it, and instead both
// sides prove that they know the secret by sending an HMAC, keyed with it,
// of the TLS session's exported keying material (RFC 5705 / 8446 §7.5).
// That value is the same at both ends of one TLS session and differs on
// each side of a man in the middle, so a proof cannot be replayed on
// another connection or relayed through an interceptor. The worker proves
// first; the broker answers only to a worker that did, so a client without
// the secret learns nothing about it.
//
// Links over unix sockets (one host; the run directory is private) stay
// plain.

// ErrNotAuthenticated is returned when the peer's proof does not match the
// secret (a different cluster secret, or none).
var ErrNotAuthenticated = errors.New("link: peer does not know the cluster secret")

const (
	// MinSecret is the shortest cluster secret accepted (bytes).
	MinSecret   = 16
	proofSize   = sha256.Size
	ekmLabel    = "EXPORTER-shoal-link"
	secureLimit = 10 * time.Second // handshake + proofs, when the caller sets no deadline
)

// Secure holds what one process needs to secure its links.
type Secure struct {
	// keys are the HMAC keys derived from the secrets: a worker proves
	// with the first; a broker accepts a proof made with any of them and
	// answers with that one, so that nodes keep talking while the secret
	// is being changed.
	keys   [][]byte
	server *tls.Config // brokers: the ephemeral certificate
}

// NewSecure derives the link keys from the cluster secrets (the one in use
// first, then any still accepted) and makes the ephemeral certificate a
// broker serves.
func NewSecure(secrets ...[]byte) (*Secure, error) {
	if len(secrets) == 0 {
		return nil, errors.New("link: no cluster secret")
	}
	var keys [][]byte
	for _, secret := range secrets {
		if len(secret) < MinSecret {
			return nil, fmt.Errorf("link: a cluster secret has %d bytes, need at least %d", len(secret), MinSecret)
		}
		k := sha256.Sum256(append([]byte("shoal link key\x00"), secret...))
		keys = append(keys, k[:])
	}
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("link: generating the link key pair: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(10 * 365 * 24 * time.Hour),
		DNSNames:     []string{"shoal-broker"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, pub, priv)
	if err != nil {
		return nil, fmt.Errorf("link: making the link certificate: %w", err)
	}
	return &Secure{
		keys: keys,
		server: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: priv}},
		},
	}, nil
}

// proof is the HMAC a side sends with key: role separates the two
// directions.
func proof(key []byte, role string, ekm []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(role))
	m.Write(ekm)
	return m.Sum(nil)
}

// Server secures an accepted link: TLS, then the worker's proof is checked
// and the broker's sent. On error conn is closed.
func (s *Secure) Server(ctx context.Context, conn net.Conn) (net.Conn, error) {
	tc := tls.Server(conn, s.server)
	err := s.exchange(ctx, tc, conn, "broker", "worker")
	if err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// Client secures a dialled link: TLS (the broker's certificate is not
// verified: the proofs authenticate it), the worker's proof sent, the
// broker's checked. On error conn is closed.
func (s *Secure) Client(ctx context.Context, conn net.Conn) (net.Conn, error) {
	tc := tls.Client(conn, &tls.Config{
		MinVersion:         tls.VersionTLS13,
		InsecureSkipVerify: true, // authenticated by the proofs below
		ServerName:         "shoal-broker",
	})
	err := s.exchange(ctx, tc, conn, "worker", "broker")
	if err != nil {
		tc.Close()
		return nil, err
	}
	return tc, nil
}

// exchange runs the TLS handshake and the proofs: the worker writes first,
// the broker checks before it answers.
func (s *Secure) exchange(ctx context.Context, tc *tls.Conn, raw net.Conn, me, peer string) error {
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(secureLimit)
	}
	_ = raw.SetDeadline(deadline)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("link: TLS handshake: %w (does the peer have the cluster secret set?)", err)
	}
	cs := tc.ConnectionState()
	ekm, err := cs.ExportKeyingMaterial(ekmLabel, nil, 32)
	if err != nil {
		return fmt.Errorf("link: exporting keying material: %w", err)
	}
	// The worker proves with its first key and accepts the answer made
	// with it; the broker accepts any of its keys and answers with the one
	// that matched.
	key := s.keys[0]
	send := func() error {
		if _, err := tc.Write(proof(key, me, ekm)); err != nil {
			return fmt.Errorf("link: sending the secret's proof: %w", err)
		}
		return nil
	}
	check := func(keys [][]byte) error {
		got := make([]byte, proofSize)
		if _, err := io.ReadFull(tc, got); err != nil {
			return fmt.Errorf("link: reading the peer's proof: %w (%w)", err, ErrNotAuthenticated)
		}
		for _, k := range keys {
			if hmac.Equal(got, proof(k, peer, ekm)) {
				key = k
				return nil
			}
		}
		return ErrNotAuthenticated
	}
	if me == "worker" {
		err = send()
		if err == nil {
			err = check(s.keys[:1])
		}
	} else {
		err = check(s.keys)
		if err == nil {
			err = send()
		}
	}
	if err != nil {
		return err
	}
	_ = raw.SetDeadline(time.Time{})
	return nil
}
