package supervisor

import (
	"crypto/x509"
	"encoding/pem"
	"os"

	"github.com/shoalhq/shoal/balancer"
	"github.com/shoalhq/shoal/configs"
)

// devCertFingerprint reads the development certificate that the process
// terminating TLS (the balancers, or with balancers: 0 every worker) shares
// under <storage.dir>/tls/ when listen.tls.auto is on, and returns its path
// and SHA-256 fingerprint, so the ready lines print it once for the whole
// node. Empty when TLS auto is off or the file cannot be read.
func devCertFingerprint(cfg configs.Config) (path, fp string) {
	if cfg.Listen.TLS.Listen == "" || !cfg.Listen.TLS.Auto || cfg.Listen.TLS.Cert != "" {
		return "", ""
	}
	path = balancer.DevCertPath(cfg.Storage.Dir)
	data, err := os.ReadFile(path)
	if err != nil {
		return "", ""
	}
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "CERTIFICATE" {
		return "", ""
	}
	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return "", ""
	}
	return path, balancer.Fingerprint(cert)
}
