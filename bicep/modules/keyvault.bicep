// Key Vault (RBAC) with the vendor credentials and admin tokens that the
// container apps reference by URL and mount as files. The app identity may
// read exactly these two secrets.
//
// Secret values are written only when given: the first deployment must pass
// both; later deployments pass empty strings and leave the stored values (and
// any rotation done with `az keyvault secret set`) untouched.

param location string
param name string

@secure()
param vendorKeys string

@secure()
param adminTokens string

param appPrincipalId string

@description('Log Analytics workspace receiving the audit log (every secret read) and metrics.')
param logAnalyticsWorkspaceId string

var vendorKeysSecretName = 'vendor-keys'
var adminTokensSecretName = 'admin-tokens'

// Built-in role: Key Vault Secrets User.
var secretsUserRoleId = subscriptionResourceId('Microsoft.Authorization/roleDefinitions', '4633458b-17de-408a-b874-0445c86b69e6')

resource vault 'Microsoft.KeyVault/vaults@2026-05-15' = {
  name: name
  location: location
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
  }
}

resource vendorKeysValue 'Microsoft.KeyVault/vaults/secrets@2026-05-15' = if (!empty(vendorKeys)) {
  parent: vault
  name: vendorKeysSecretName
  properties: {
    value: vendorKeys
  }
}

resource adminTokensValue 'Microsoft.KeyVault/vaults/secrets@2026-05-15' = if (!empty(adminTokens)) {
  parent: vault
  name: adminTokensSecretName
  properties: {
    value: adminTokens
  }
}

// Scopes for the role assignments, whether or not this deployment wrote a value.
resource vendorKeysSecret 'Microsoft.KeyVault/vaults/secrets@2026-05-15' existing = {
  parent: vault
  name: vendorKeysSecretName
}

resource adminTokensSecret 'Microsoft.KeyVault/vaults/secrets@2026-05-15' existing = {
  parent: vault
  name: adminTokensSecretName
}

resource appReadsVendorKeys 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(vendorKeysSecret.id, appPrincipalId, secretsUserRoleId)
  scope: vendorKeysSecret
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: secretsUserRoleId
  }
  dependsOn: [
    vendorKeysValue
  ]
}

resource appReadsAdminTokens 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(adminTokensSecret.id, appPrincipalId, secretsUserRoleId)
  scope: adminTokensSecret
  properties: {
    principalId: appPrincipalId
    principalType: 'ServicePrincipal'
    roleDefinitionId: secretsUserRoleId
  }
  dependsOn: [
    adminTokensValue
  ]
}

resource vaultDiagnostics 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: vault
  properties: {
    workspaceId: logAnalyticsWorkspaceId
    logs: [
      {
        categoryGroup: 'audit'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

output vaultUri string = vault.properties.vaultUri
// Versionless URLs: Container Apps fetches a rotated value within 30 minutes
// without a redeploy (docs/deploy.md, "Rotating a secret").
output vendorKeysSecretUrl string = '${vault.properties.vaultUri}secrets/${vendorKeysSecretName}'
output adminTokensSecretUrl string = '${vault.properties.vaultUri}secrets/${adminTokensSecretName}'
