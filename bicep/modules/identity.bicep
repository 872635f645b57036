// User-assigned managed identities.
//
// `app` is what rtpd authenticates as (Blob, Service Bus, Redis, Key Vault).
// `scaler` is used only by the processor's KEDA scale rule: reading a queue's
// message count needs the Manage right (Azure Service Bus Data Owner), which the
// app identity must not have. Both are attached to the processor app; rtpd picks
// `app` through the standard AZURE_CLIENT_ID variable (apps.bicep).

param location string
param appIdentityName string
param scalerIdentityName string

resource app 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: appIdentityName
  location: location
}

resource scaler 'Microsoft.ManagedIdentity/userAssignedIdentities@2024-11-30' = {
  name: scalerIdentityName
  location: location
}

output appIdentityId string = app.id
// Also the PostgreSQL role name rtpd logs in as (docs/deploy.md).
output appIdentityName string = app.name
output appClientId string = app.properties.clientId
output appPrincipalId string = app.properties.principalId
output scalerIdentityId string = scaler.id
output scalerPrincipalId string = scaler.properties.principalId
